//! The public HTTP/JSON API under `/v1` (documented in `docs/openapi.json`, which a test keeps in
//! step with [`ROUTES`]), bearer-token auth, the client file the CLI finds the server by, and the
//! live web view at `/ui` (static files that call the API like any other client).
//!
//! Every error is JSON `{"error": {"code", "message"}}` with a matching status; no input makes
//! the server panic or lose state: operations go through [`Mgmt`], which validates before it
//! changes anything.
//!
//! HTTP/1.1 is hyper's (on a tokio runtime of the server's own, TLS by tokio-rustls); what is ours
//! is the bounds around it. A request head is at most [`MAX_HEAD`] bytes (hyper's buffer limit:
//! 431), a body at most [`MAX_BODY`] (checked against `Content-Length` before anything is read or
//! allocated: 413); the head must arrive within [`HEAD_TIMEOUT`] of connecting (408, written by
//! [`ConnIo`], which times the wait for a head) and the body within [`BODY_TIMEOUT`] after it. At
//! most [`MAX_CONNECTIONS`] are served at once, [`MAX_PER_CLIENT`] from one address (IPv6: one
//! /64). [`Mgmt`] is synchronous (locks, blocking calls to units and agents): each call runs on
//! the runtime's blocking pool, so a slow call (a delete waits for units to stop) or a slow client
//! holds up nobody else. Connections that have not yet sent a whole head cost their client
//! nothing to lose and are what a flood of idle connections is made of: when a limit is reached,
//! the oldest of those (of that client first; a fresh one, a kept-alive idle one, or one still in
//! its TLS handshake) is closed to make room, so idle connections can never lock everyone out,
//! also when they come from the same address (every local user is 127.0.0.1). The acceptor never
//! waits on a client.
//!
//! HTTP/1.1 connections are kept alive (the web view polls every second): after an answer the
//! connection goes back to waiting for a head (the service marks a connection serving when hyper
//! hands it a request, and idle again when the answer's body is done), evictable like a fresh
//! one, for at most [`KEEPALIVE_IDLE`], and serves at most [`MAX_REQUESTS`]. Whatever leaves the
//! stream in doubt (a body not read, a malformed request) and every stream (watch, capture,
//! monitor) closes it; `Connection: close` is honoured (the CLI sends it). Streams are response
//! bodies fed by a producer on the blocking pool through a bounded channel; the producer stops
//! when the client goes away (the channel closes, or the socket reports the client's end closed).
//!
//! With [`ServeOptions::tls`] the port speaks TLS 1.2/1.3 only. The handshake runs in the
//! connection's task, within the head's deadline: a client that connects and never handshakes is
//! an idle connection like any other (counted, evictable, timed out).
//! (tiny_http 0.12, tried first, allocates a request's declared `Content-Length` when it drops an
//! unread body: one unauthenticated request declaring a few TB aborted the process; hyper reads a
//! body only as the service asks for it.)

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv6Addr, Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http::header::{
    HeaderValue, AUTHORIZATION, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HOST, IF_MATCH,
    TRANSFER_ENCODING,
};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming, SizeHint};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

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
/// per poll; longer would only hold connections for clients that left, which eviction reclaims
/// anyway when room is needed.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
/// Requests one connection serves before it is closed (its last answer says so): a client
/// cannot hold one connection for ever, and a long-lived one is spread over fresh connections.
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
    /// Connection tasks alive (what [`ApiServer::stop`] waits for).
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
    /// acceptor and the connection's service each claim it with one compare-exchange, so a
    /// connection is never closed once its request is being served.
    phase: AtomicU8,
    /// The socket (a handle of its own beside hyper's): to close it when room is needed (its
    /// task, reading a head or a TLS handshake, sees the end of input and finishes), and to ask
    /// whether a stream's client left.
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
    fn admit(
        &mut self,
        client: ClientKey,
        stream: TcpStream,
    ) -> Result<Arc<Slot>, (String, TcpStream)> {
        if self.open.iter().filter(|c| c.client == client).count() >= MAX_PER_CLIENT
            && !self.evict(|c| c.client == client)
        {
            return Err((
                format!(
                    "too many connections from {} (at most {MAX_PER_CLIENT}); retry",
                    client.0
                ),
                stream,
            ));
        }
        if self.open.len() >= MAX_CONNECTIONS && !self.evict(|_| true) {
            return Err((
                format!("too many connections (at most {MAX_CONNECTIONS}); retry"),
                stream,
            ));
        }
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
        // Its task, waiting to read (a head, or a TLS handshake), sees the end of input and
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
    /// Wakes the acceptor to see the stop flag.
    wake: Arc<tokio::sync::Notify>,
    /// The runtime's thread: accepts, then (stopping) waits for the connections.
    runner: Option<JoinHandle<()>>,
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
        let Some(runner) = self.runner.take() else {
            return;
        };
        self.shared.stop.store(true, Ordering::SeqCst);
        // Watches wake to see it.
        self.shared.mgmt.inner.notify();
        self.wake.notify_one();
        let _ = runner.join();
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Serve the API on `listen` over plain HTTP (at most [`MAX_CONNECTIONS`] at once).
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
    // One thread drives every connection (an API's I/O is light); the engine's calls and the
    // streams' producers run on the blocking pool, at most one per connection at a time.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(MAX_CONNECTIONS + 16)
        .thread_name("api")
        .build()
        .context("starting the API's runtime")?;
    let listener =
        std::net::TcpListener::bind(listen).with_context(|| format!("listening on {listen}"))?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let listener = {
        let _entered = runtime.enter();
        tokio::net::TcpListener::from_std(listener)?
    };
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
    let wake = Arc::new(tokio::sync::Notify::new());
    let runner = {
        let (shared, wake) = (shared.clone(), wake.clone());
        std::thread::Builder::new()
            .name("api-accept".into())
            .spawn(move || {
                runtime.block_on(run(listener, &shared, &wake));
                // Whatever is still running after STOP_WAIT (a call stuck in a unit) is left.
                runtime.shutdown_timeout(Duration::from_millis(100));
            })?
    };
    Ok(ApiServer {
        addr,
        shared,
        wake,
        runner: Some(runner),
    })
}

/// Accept until stopped; then close the idle connections and wait (at most [`STOP_WAIT`]) for the
/// others to finish.
async fn run(listener: tokio::net::TcpListener, shared: &Arc<Shared>, wake: &tokio::sync::Notify) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => dispatch(shared, stream, peer.ip()),
                // Out of file descriptors and the like: back off instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            },
            () = wake.notified() => {}
        }
        if shared.stop.load(Ordering::Acquire) {
            break;
        }
    }
    drop(listener);
    shared.conns().evict_all_idle();
    let deadline = Instant::now() + STOP_WAIT;
    while shared.active.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A connection in progress, for as long as its task lives (also through a panic): counted,
/// registered with the limits, and its socket closed at the end (a producer may still hold the
/// registry's handle on it).
struct Active {
    shared: Arc<Shared>,
    slot: Arc<Slot>,
}

impl Drop for Active {
    fn drop(&mut self) {
        let _ = self.slot.stream.shutdown(Shutdown::Both);
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

/// An answer written straight to a socket, bypassing hyper: where there is no HTTP exchange to
/// answer within (a connection refused for room, a head that never came).
fn raw_answer(r: &Reply) -> Vec<u8> {
    let reason = http::StatusCode::from_u16(r.status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    let mut out = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        r.status,
        r.content_type,
        r.body.len()
    )
    .into_bytes();
    out.extend_from_slice(r.body.as_bytes());
    out
}

/// Answer 503 from the acceptor without ever waiting on the client: one non-blocking write (a
/// new connection's send buffer is empty, so it fits), whatever becomes of it. Over TLS the
/// connection is just closed: an answer would need a handshake, which may wait on the client.
fn busy(shared: &Shared, stream: &TcpStream, why: String) {
    if shared.tls.is_some() {
        return;
    }
    let _ = stream.set_nonblocking(true);
    let _ = (&*stream).write(&raw_answer(&Reply::error(503, "unavailable", why)));
}

fn dispatch(shared: &Arc<Shared>, stream: tokio::net::TcpStream, peer: IpAddr) {
    use std::os::fd::AsFd;
    // A second handle on the socket, outside hyper's: to close it when room is needed, and to
    // ask whether a stream's client left.
    let Ok(handle) = stream.as_fd().try_clone_to_owned().map(TcpStream::from) else {
        shared.count(503);
        return;
    };
    let admitted = shared.conns().admit(ClientKey::of(peer), handle);
    let slot = match admitted {
        Ok(slot) => slot,
        Err((why, handle)) => {
            shared.count(503);
            return busy(shared, &handle, why);
        }
    };
    shared.active.fetch_add(1, Ordering::AcqRel);
    let active = Active {
        shared: shared.clone(),
        slot,
    };
    tokio::spawn(connection(active, stream, tokio::time::Instant::now()));
}

/// One connection: the TLS handshake (within the head's deadline), then hyper's HTTP/1.1 over
/// [`ConnIo`], then a short linger so the client reads our last answer rather than a reset.
async fn connection(active: Active, tcp: tokio::net::TcpStream, connected: tokio::time::Instant) {
    let _ = tcp.set_nodelay(true);
    let conn = Arc::new(ConnState {
        shared: active.shared.clone(),
        slot: active.slot.clone(),
        requests: AtomicU32::new(0),
        answered: AtomicU32::new(0),
    });
    let head_by = connected + HEAD_TIMEOUT;
    match active.shared.tls.clone() {
        None => serve_http(ConnIo::new(tcp, conn.clone(), head_by), &conn).await,
        Some(config) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(config);
            // No answer is possible before the handshake: a late or failed one just closes.
            if let Ok(Ok(tls)) = tokio::time::timeout_at(head_by, acceptor.accept(tcp)).await {
                serve_http(ConnIo::new(tls, conn.clone(), head_by), &conn).await;
            }
        }
    }
    linger(&active.slot.stream).await;
}

async fn serve_http<S>(io: ConnIo<S>, conn: &Arc<ConnState>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = {
        let conn = conn.clone();
        hyper::service::service_fn(move |req| {
            let conn = conn.clone();
            async move { Ok::<_, Infallible>(handle(conn, req).await) }
        })
    };
    let _ = hyper::server::conn::http1::Builder::new()
        // The head's deadline is ConnIo's: hyper's would also cut kept-alive connections idle
        // for less than KEEPALIVE_IDLE, and closes without the 408.
        .header_read_timeout(None)
        // A client may end its side once its request is sent (it still reads the answer).
        .half_close(true)
        .max_buf_size(MAX_HEAD)
        .max_headers(MAX_HEADERS)
        // Clients written against the hand-made server (and its tests) read `Connection:`.
        .title_case_headers(true)
        .serve_connection(hyper_util::rt::TokioIo::new(io), service)
        .await;
}

/// What a connection's task and its service share.
struct ConnState {
    shared: Arc<Shared>,
    slot: Arc<Slot>,
    /// Requests handed to the service so far.
    requests: AtomicU32,
    /// Answers done after which the connection was kept alive (see [`ConnIo`]).
    answered: AtomicU32,
}

/// The connection's socket (TCP, or TLS over it) as hyper reads and writes it, timing what
/// hyper has no timer for in the form needed here: while the connection waits for a head, a
/// fresh connection's head is due [`HEAD_TIMEOUT`] after connecting (408, then closed); a
/// kept-alive connection waits [`KEEPALIVE_IDLE`] for its next request to begin (then closes,
/// silently), then [`HEAD_TIMEOUT`] for the rest of its head. A write that makes no progress
/// for [`WRITE_TIMEOUT`] fails (a client that stopped reading).
struct ConnIo<S> {
    io: S,
    conn: Arc<ConnState>,
    /// `answered` when the current wait for a head began.
    seen: u32,
    /// Whether the current wait is a kept-alive connection's (no byte of the next request yet).
    idle: bool,
    deadline: Pin<Box<tokio::time::Sleep>>,
    timed_out: bool,
    /// Since when a write has been waiting for the client.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> ConnIo<S> {
    fn new(io: S, conn: Arc<ConnState>, head_by: tokio::time::Instant) -> ConnIo<S> {
        ConnIo {
            io,
            conn,
            seen: 0,
            idle: false,
            deadline: Box::pin(tokio::time::sleep_until(head_by)),
            timed_out: false,
            stalled: None,
        }
    }

    /// Best effort (one write, no wait: the connection is closed right after): tell a client
    /// whose head is late why it is cut off.
    fn send_timeout(&mut self, cx: &mut TaskContext<'_>) {
        let r = Reply::error(
            408,
            "timeout",
            format!(
                "the request head did not arrive within {} s",
                HEAD_TIMEOUT.as_secs()
            ),
        );
        let _ = Pin::new(&mut self.io).poll_write(cx, &raw_answer(&r));
        let _ = Pin::new(&mut self.io).poll_flush(cx);
    }

    /// A write's progress, failing one that waited [`WRITE_TIMEOUT`] for the client.
    fn bound_write<T>(
        &mut self,
        cx: &mut TaskContext<'_>,
        r: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        if r.is_ready() {
            self.stalled = None;
            return r;
        }
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(WRITE_TIMEOUT)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::ErrorKind::TimedOut.into())),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for ConnIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        // Serving: the body's time is the service's to bound.
        if this.conn.slot.phase.load(Ordering::SeqCst) != IN_HEAD {
            return r;
        }
        let answered = this.conn.answered.load(Ordering::SeqCst);
        if answered != this.seen {
            // A kept-alive connection begins to wait for its next request.
            this.seen = answered;
            this.idle = true;
            let at = tokio::time::Instant::now() + KEEPALIVE_IDLE;
            this.deadline.as_mut().reset(at);
        }
        match r {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                if this.idle {
                    this.idle = false;
                    let at = tokio::time::Instant::now() + HEAD_TIMEOUT;
                    this.deadline.as_mut().reset(at);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                if this.deadline.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                if !this.idle && !this.timed_out {
                    this.timed_out = true;
                    this.send_timeout(cx);
                }
                // The end of input, as far as hyper is concerned: it closes the connection.
                Poll::Ready(Ok(()))
            }
            r => r,
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for ConnIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write(cx, data);
        this.bound_write(cx, r)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_flush(cx);
        this.bound_write(cx, r)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_shutdown(cx);
        this.bound_write(cx, r)
    }
}

/// Close after the answer without resetting it away: stop sending (hyper did, over TLS with a
/// close_notify), then drain what the client still sends (a body we refused) for a short while,
/// from the TCP socket itself (over TLS too: it is only thrown away).
async fn linger(socket: &TcpStream) {
    let _ = socket.shutdown(Shutdown::Write);
    let Ok(s) = socket
        .try_clone()
        .and_then(|s| s.set_nonblocking(true).map(|()| s))
        .and_then(tokio::net::TcpStream::from_std)
    else {
        return;
    };
    let until = tokio::time::Instant::now() + LINGER;
    let mut sink = [0u8; 16 << 10];
    let mut drained = 0usize;
    while drained <= MAX_BODY {
        match tokio::time::timeout_at(until, s.readable()).await {
            Ok(Ok(())) => {}
            _ => return,
        }
        match s.try_read(&mut sink) {
            Ok(0) => return,
            Ok(n) => drained += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}
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

    /// The answer's headers; `keep_alive`: the connection serves another request after it.
    fn headers(&self, keep_alive: bool) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert(CONTENT_TYPE, HeaderValue::from_static(self.content_type));
        h.insert(CONTENT_LENGTH, HeaderValue::from(self.body.len()));
        h.insert(CONNECTION, connection_value(keep_alive));
        if self.status == 401 {
            h.insert(
                http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer"),
            );
        }
        for (name, value) in self.headers {
            h.insert(*name, HeaderValue::from_static(value));
        }
        h
    }

    /// The answer as hyper sends it. A HEAD request gets the same head (its `Content-Length`
    /// too), and hyper leaves out the body.
    fn into_response(self, keep_alive: bool, served: Served) -> http::Response<AnswerBody> {
        let status = http::StatusCode::from_u16(self.status)
            .unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
        let headers = self.headers(keep_alive);
        let mut r = http::Response::new(AnswerBody {
            data: AnswerData::Full(Some(Bytes::from(self.body))),
            _served: served,
        });
        *r.status_mut() = status;
        *r.headers_mut() = headers;
        r
    }
}

fn connection_value(keep_alive: bool) -> HeaderValue {
    HeaderValue::from_static(if keep_alive { "keep-alive" } else { "close" })
}

/// An answer's body: whole, or a stream's chunks as its producer sends them.
struct AnswerBody {
    data: AnswerData,
    /// Dropped with the body, once hyper has taken all of it or given up on it.
    _served: Served,
}

enum AnswerData {
    Full(Option<Bytes>),
    Stream(tokio::sync::mpsc::Receiver<Bytes>),
}

impl hyper::body::Body for AnswerBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match &mut self.get_mut().data {
            AnswerData::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            AnswerData::Stream(rx) => rx.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.data, AnswerData::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match &self.data {
            AnswerData::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            AnswerData::Stream(_) => SizeHint::default(),
        }
    }
}

/// The end of serving one request: its answer time recorded, and a kept-alive connection back
/// to waiting for a head, from where it may be closed to make room like a new one.
struct Served {
    conn: Arc<ConnState>,
    keep_alive: bool,
    /// When the request head had arrived, and the labels its answer time goes under; `None` for
    /// streams (counted but not timed, or they would swamp every other answer time).
    timed: Option<(Instant, ApiRoute)>,
}

impl Drop for Served {
    fn drop(&mut self) {
        let sh = &self.conn.shared;
        if let Some((arrived, labels)) = self.timed.take() {
            sh.latency
                .get_or_create(&labels)
                .observe(arrived.elapsed().as_secs_f64());
        }
        if !self.keep_alive {
            return;
        }
        self.conn.answered.fetch_add(1, Ordering::SeqCst);
        let slot = &self.conn.slot;
        // The stop flag is read after that, so a stopping server that saw this connection still
        // serving does not leave it waiting.
        if slot
            .phase
            .compare_exchange(SERVING, IN_HEAD, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
            && sh.stop.load(Ordering::SeqCst)
        {
            let _ = slot.stream.shutdown(Shutdown::Both);
        }
    }
}

/// What a request head says that matters here.
#[derive(Debug, Default)]
struct Head {
    method: String,
    target: String,
    authorization: Option<String>,
    content_length: Option<u64>,
    /// A `Transfer-Encoding`: refused (411), bodies come with their length.
    chunked: bool,
    /// `If-Match: "<generation>"` (or `W/"…"`, or bare): the generation a write expects.
    if_match: Option<String>,
    /// `X-Dva-Forwarded`: a replica forwarded this call to the one it takes for the leader, so
    /// it is never forwarded again (no loops while an election settles).
    forwarded: bool,
    /// Whether the client would send another request on this connection: HTTP/1.1 unless it
    /// says `Connection: close`, HTTP/1.0 only if it says `Connection: keep-alive`.
    keep_alive: bool,
}

impl Head {
    fn of<B>(req: &http::Request<B>) -> Head {
        let h = req.headers();
        let text = |name| {
            h.get(name)
                .and_then(|v: &HeaderValue| v.to_str().ok())
                .map(str::to_string)
        };
        let (mut close, mut keep_alive) = (false, req.version() == http::Version::HTTP_11);
        for value in h.get_all(CONNECTION) {
            for option in value.to_str().unwrap_or("").split(',').map(str::trim) {
                close |= option.eq_ignore_ascii_case("close");
                keep_alive |= option.eq_ignore_ascii_case("keep-alive");
            }
        }
        Head {
            method: req.method().as_str().to_string(),
            target: req
                .uri()
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_string(),
            authorization: text(AUTHORIZATION),
            // hyper refused a malformed or conflicting length already.
            content_length: h
                .get(CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse().ok()),
            chunked: h.contains_key(TRANSFER_ENCODING),
            if_match: text(IF_MATCH),
            forwarded: h.contains_key("x-dva-forwarded"),
            // `close` wins over anything else said.
            keep_alive: keep_alive && !close,
        }
    }
}

fn bad(message: &str) -> Reply {
    Reply::error(400, "bad_request", message.to_string())
}

/// Read the body `head` announces, refusing one over [`MAX_BODY`] before reading any of it.
async fn read_body(head: &Head, body: Incoming) -> Result<String, Reply> {
    let len = head.content_length.unwrap_or(0);
    if len > MAX_BODY as u64 {
        return Err(Reply::error(
            413,
            "too_large",
            format!("body of {len} bytes is over the limit of {MAX_BODY}"),
        ));
    }
    let read = http_body_util::Limited::new(body, MAX_BODY).collect();
    let bytes = match tokio::time::timeout(BODY_TIMEOUT, read).await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(_)) => return Err(bad("the body is shorter than its Content-Length")),
        Err(_) => {
            return Err(Reply::error(
                408,
                "timeout",
                format!(
                    "the request body did not arrive within {} s",
                    BODY_TIMEOUT.as_secs()
                ),
            ))
        }
    };
    String::from_utf8(bytes.into()).map_err(|_| bad("the body is not UTF-8"))
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

/// Serve one request of a connection (hyper hands them over one at a time).
async fn handle(conn: Arc<ConnState>, req: http::Request<Incoming>) -> http::Response<AnswerBody> {
    let sh = conn.shared.clone();
    let arrived = Instant::now();
    // A whole head arrived: from here on the connection is not closed to make room (unless that
    // happened already, and then nobody reads the answer).
    let serving = conn
        .slot
        .phase
        .compare_exchange(IN_HEAD, SERVING, Ordering::SeqCst, Ordering::SeqCst)
        .is_ok();
    let n = conn.requests.fetch_add(1, Ordering::SeqCst) + 1;
    let head = Head::of(&req);
    // A body announced is read only by the calls that take one: until then the next request's
    // start is unknown.
    let can_keep = serving
        && head.keep_alive
        && !head.chunked
        && n < MAX_REQUESTS
        && !sh.stop.load(Ordering::SeqCst);
    let mut keep_alive = can_keep && head.content_length.unwrap_or(0) == 0;
    let routed = route(&head.method, &head.target);
    let timed = Some((
        arrived,
        route_labels(&head.method, routed.as_ref().ok().copied()),
    ));
    let answer = match routed {
        // Closed to make room as its head arrived: nobody will read an answer, so nothing is
        // done for it.
        _ if !serving => Answer::Reply(Reply::error(
            503,
            "unavailable",
            "closed to make room for other connections; retry".into(),
        )),
        Err(r) => Answer::Reply(r),
        Ok(call) => {
            let what = (call.guarded(), call.has_body());
            let body = req.into_body();
            answer(&sh, head, what, body, (&mut keep_alive, can_keep)).await
        }
    };
    let served = |timed| Served {
        conn: conn.clone(),
        keep_alive,
        timed,
    };
    let reply = match answer {
        Answer::Reply(r) => r,
        Answer::Stream(content_type, produce) => {
            sh.count(200);
            return stream_response(&conn, content_type, produce, served(None));
        }
    };
    sh.count(reply.status);
    reply.into_response(keep_alive, served(timed))
}

/// A stream's producer: writes until done, the client gone (`gone`), or a write failing.
type Producer = Box<dyn FnOnce(&mut dyn Write, &mut dyn FnMut() -> bool) + Send>;

/// What a request gets: a complete reply, or a stream of this content type.
enum Answer {
    Reply(Reply),
    Stream(&'static str, Producer),
}

/// A streamed answer (no length: chunked, and the connection closes after it): its producer runs
/// on the blocking pool, handing chunks to hyper through a bounded channel. It stops when the
/// channel closes (hyper gave up on the body: the client went away or stopped reading), when the
/// client's end of the socket closes (it sends nothing after its request, so that means it left,
/// even while nothing is written), or when the server stops.
fn stream_response(
    conn: &Arc<ConnState>,
    content_type: &'static str,
    produce: Producer,
    served: Served,
) -> http::Response<AnswerBody> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    let producer = {
        let conn = conn.clone();
        move || {
            let mut out = ChannelWriter(tx.clone());
            let mut client = client_gone(&conn.slot.stream);
            let mut gone =
                || tx.is_closed() || conn.shared.stop.load(Ordering::Acquire) || client();
            produce(&mut out, &mut gone);
        }
    };
    // Without a thread for it the stream is empty (its sender dropped with the closure).
    drop(tokio::task::spawn_blocking(producer));
    let mut r = http::Response::new(AnswerBody {
        data: AnswerData::Stream(rx),
        _served: served,
    });
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    h.insert(CONNECTION, connection_value(false));
    r
}

/// A stream's output: each write one chunk of the answer's body, waiting while the channel is
/// full (the client reads slower than the producer writes).
struct ChannelWriter(tokio::sync::mpsc::Sender<Bytes>);

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .blocking_send(Bytes::copy_from_slice(buf))
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Answer a routed request: the token, the body, then [`decide`] on the blocking pool (the
/// engine is synchronous), then forwarding to the leader if it says so.
async fn answer(
    sh: &Arc<Shared>,
    head: Head,
    (guarded, has_body): (bool, bool),
    body: Incoming,
    (keep_alive, can_keep): (&mut bool, bool),
) -> Answer {
    if head.chunked {
        return Answer::Reply(Reply::error(
            411,
            "length_required",
            "chunked bodies are not accepted: send Content-Length".into(),
        ));
    }
    if guarded && !authorized(&head, &sh.token) {
        return Answer::Reply(Reply::error(
            401,
            "unauthorized",
            "missing or wrong bearer token (Authorization: Bearer <token>; `dva serve` keeps it in <state>/token)".into(),
        ));
    }
    let body = if has_body {
        match read_body(&head, body).await {
            Ok(b) => {
                // Read whole: the next request starts right after it.
                *keep_alive = can_keep;
                b
            }
            Err(r) => return Answer::Reply(r),
        }
    } else {
        String::new()
    };
    let decided = {
        let sh = sh.clone();
        tokio::task::spawn_blocking(move || {
            let d = decide(&sh, &head, &body);
            (d, head, body)
        })
        .await
    };
    match decided {
        Ok((Decision::Answer(a), _, _)) => a,
        Ok((Decision::Forward(api), head, body)) => {
            Answer::Reply(forward(&api, &head, body, sh.forward_tls.as_ref()).await)
        }
        // Mgmt does not panic on input; should a bug make it, the caller gets a 500 and the
        // server keeps serving.
        Err(_) => Answer::Reply(Reply::error(
            500,
            "internal",
            "the call failed unexpectedly".into(),
        )),
    }
}

/// What [`decide`] concluded.
enum Decision {
    Answer(Answer),
    /// Only the leader answers it, and that is the replica at this API address.
    Forward(String),
}

/// The engine's part of answering an authorized request whose body (if any) was read: blocking
/// (the leader may be settling, calls wait on units), so it runs on the blocking pool.
fn decide(sh: &Arc<Shared>, head: &Head, body: &str) -> Decision {
    let reply = |r| Decision::Answer(Answer::Reply(r));
    let call = match route(&head.method, &head.target) {
        Ok(c) => c,
        Err(r) => return reply(r),
    };
    if let (Call::Capture(..) | Call::Monitor(..), Leader::Other(api)) = (call, sh.mgmt.leader()) {
        // A capture or monitor streams for seconds: relayed through a follower it would hold two
        // connections; the leader answers it directly.
        return reply(Reply::not_leader(
            "captures and monitors",
            format!("{}://{api}", sh.scheme()),
        ));
    }
    if let Call::List | Call::Get(_) | Call::Events(_) = call {
        let timeout = match watch_query(&head.target) {
            Ok(t) => t,
            Err(r) => return reply(r),
        };
        if let Some(timeout) = timeout {
            if let Leader::Other(api) = sh.mgmt.leader() {
                // The leader alone knows the units' state as it changes.
                return reply(Reply::not_leader(
                    "watches",
                    format!("{}://{api}", sh.scheme()),
                ));
            }
            let what = match call {
                Call::Get(name) => Watched::Get(name.to_string()),
                Call::Events(name) => Watched::Events(name.to_string()),
                _ => Watched::List,
            };
            // A missing appliance is a plain 404, not an empty stream.
            if let Watched::Get(name) | Watched::Events(name) = &what {
                if let Err(e) = sh.mgmt.get(name) {
                    return reply(Reply::api(e));
                }
            }
            let mgmt = sh.mgmt.clone();
            return Decision::Answer(Answer::Stream(
                "application/x-ndjson",
                Box::new(move |out, gone| {
                    let _ = watch(&mgmt, &what, timeout, out, gone);
                }),
            ));
        }
    }
    if let Call::Monitor(name, query) = call {
        return Decision::Answer(match sh.mgmt.monitor(name, query) {
            Ok(streams) => Answer::Stream(
                "application/x-ndjson",
                Box::new(move |out, gone| {
                    let _ = streams.copy_to(out, gone);
                }),
            ),
            Err(e) => Answer::Reply(Reply::api(e)),
        });
    }
    if let Call::Capture(name, query) = call {
        return Decision::Answer(match sh.mgmt.capture(name, query) {
            // A client that stops reading fails a write (the channel closes), which ends it.
            Ok(streams) => Answer::Stream(
                "application/vnd.tcpdump.pcap",
                Box::new(move |out, _| {
                    let _ = streams.copy_to(out);
                }),
            ),
            Err(e) => Answer::Reply(Reply::api(e)),
        });
    }
    if call.leader_only() {
        match sh.mgmt.settled_leader(ELECTION_WAIT) {
            Leader::Me => {}
            Leader::Other(_) if head.forwarded => {
                return reply(Reply::error(
                    503,
                    "no_leader",
                    "forwarded to a replica that does not lead (an election is settling); retry"
                        .into(),
                ))
            }
            Leader::Other(api) => return Decision::Forward(api),
            Leader::Unknown => {
                return reply(Reply::error(
                    503,
                    "no_leader",
                    "no dva serve replica leads right now (an election is settling); retry".into(),
                ))
            }
        }
    }
    if let Call::Join(_) = call {
        // The API token, or a one-time join token (used up here, whatever the join's outcome).
        let ok = authorized(head, &sh.token)
            || head
                .bearer()
                .is_some_and(|t| !t.is_empty() && sh.mgmt.use_join_token(t));
        if !ok {
            return reply(Reply::error(
                401,
                "unauthorized",
                "missing, used, expired or wrong join token (Authorization: Bearer <token>; \
                 `dva join-token` makes one)"
                    .into(),
            ));
        }
    }
    match write_options(head) {
        Ok(opts) => reply(execute(sh, call, body, opts)),
        Err(r) => reply(r),
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
        // is the registry's handle on the connection's socket, which the stream's producer keeps
        // open (it holds the connection's state) for as long as it calls this, and poll(2) only
        // reports on it.
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
    out: &mut dyn Write,
    gone: &mut dyn FnMut() -> bool,
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
async fn forward(
    api: &str,
    head: &Head,
    body: String,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Reply {
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
    let mut req = http::Request::builder()
        .method(head.method.as_str())
        .uri(head.target.as_str())
        .header(HOST, api)
        .header("X-Dva-Forwarded", "1")
        .header(CONNECTION, "close");
    if let Some(a) = &head.authorization {
        req = req.header(AUTHORIZATION, a);
    }
    if let Some(m) = &head.if_match {
        req = req.header(IF_MATCH, m);
    }
    let req = match req.body(http_body_util::Full::new(Bytes::from(body))) {
        Ok(r) => r,
        Err(e) => return unavailable(e.to_string()),
    };
    let exchange = crate::client::exchange_whole(
        crate::client::Callee::Api,
        addr,
        tls,
        Duration::from_secs(2),
        req,
        MAX_BODY * 8,
    );
    match tokio::time::timeout(FORWARD_TIMEOUT, exchange).await {
        Ok(Ok(a)) => Reply::new(
            a.status,
            a.content_type
                .as_deref()
                .map_or("application/json", forwarded_type),
            a.body,
        ),
        Ok(Err(e)) => unavailable(format!("{e:#}")),
        Err(_) => unavailable(format!("no answer within {} s", FORWARD_TIMEOUT.as_secs())),
    }
}

/// The content type of another replica's answer, as one this server sends (they are ours).
fn forwarded_type(value: &str) -> &'static str {
    if value == dva_unit::metrics::CONTENT_TYPE {
        dva_unit::metrics::CONTENT_TYPE
    } else if value.starts_with("text/plain") {
        "text/plain"
    } else {
        "application/json"
    }
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
        let ui = Reply::ui("text/html", UI_HTML).headers(true);
        let header = |h: &http::HeaderMap, name: &str| {
            h.get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string()
        };
        assert!(
            header(&ui, "content-security-policy")
                .starts_with("default-src 'none'; script-src 'self'; style-src 'self'; "),
            "{ui:?}"
        );
        for (name, want) in [
            ("x-content-type-options", "nosniff"),
            ("cache-control", "no-store"),
            ("x-frame-options", "DENY"),
        ] {
            assert_eq!(header(&ui, name), want, "{ui:?}");
        }
        assert!(!format!("{ui:?}").contains("unsafe-inline"));
        // The API's own answers carry none of them (JSON is never rendered as a page).
        let api = Reply::json(200, &1).headers(true);
        assert!(!api.contains_key("content-security-policy"), "{api:?}");
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

    /// What the server reads of a request head: the body's length, the token, the forwarded
    /// mark (a call that reaches a non-leader already forwarded once is not forwarded again),
    /// and whether the connection is kept alive.
    #[test]
    fn heads_are_read_from_requests() {
        let req = |version, headers: &[(&str, &str)]| {
            let mut r = http::Request::builder()
                .method("POST")
                .uri("/v1/appliances?dryRun=All")
                .version(version);
            for (n, v) in headers {
                r = r.header(*n, *v);
            }
            Head::of(&r.body(()).expect("request"))
        };
        let h = req(
            http::Version::HTTP_11,
            &[("content-length", "12"), ("Authorization", "Bearer t")],
        );
        assert_eq!(
            (h.method.as_str(), h.target.as_str(), h.content_length),
            ("POST", "/v1/appliances?dryRun=All", Some(12))
        );
        assert_eq!(h.authorization.as_deref(), Some("Bearer t"));
        assert!(h.keep_alive && !h.forwarded && !h.chunked);
        assert!(req(http::Version::HTTP_11, &[("X-Dva-Forwarded", "1")]).forwarded);
        assert!(req(http::Version::HTTP_11, &[("Transfer-Encoding", "chunked")]).chunked);
        assert!(!req(http::Version::HTTP_11, &[("Connection", "close")]).keep_alive);
        assert!(!req(http::Version::HTTP_10, &[]).keep_alive);
        assert!(req(http::Version::HTTP_10, &[("Connection", "Keep-Alive")]).keep_alive);
        assert!(
            !req(
                http::Version::HTTP_10,
                &[("Connection", "keep-alive, close")]
            )
            .keep_alive
        );
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
    fn forwarded_answers_keep_their_type() {
        assert_eq!(
            forwarded_type(dva_unit::metrics::CONTENT_TYPE),
            dva_unit::metrics::CONTENT_TYPE
        );
        assert_eq!(forwarded_type("text/plain; charset=utf-8"), "text/plain");
        assert_eq!(forwarded_type("application/json"), "application/json");
        assert_eq!(forwarded_type("text/html"), "application/json");
    }

    /// Replicas serving TLS forward over TLS: the leader's certificate must chain to the CA
    /// trusted and name the address forwarded to; the call arrives whole, marked forwarded.
    #[test]
    fn forwarding_speaks_tls_to_a_leader_the_ca_vouches_for() {
        let pki = crate::pki::Pki::generate().expect("CA");
        let leader_cert = pki.issue_server(&["127.0.0.1".into()]).expect("cert");
        let config =
            tls_server_config(&leader_cert.cert_pem, &leader_cert.key_pem).expect("config");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
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
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                if req.is_empty() {
                    continue;
                }
                let text = String::from_utf8_lossy(&req).into_owned();
                let _ = s.write_all(&raw_answer(&Reply::new(200, "text/plain", text.clone())));
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
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let trusted = crate::client::tls_client_config(pki.ca_pem()).expect("client");
        let r = rt.block_on(forward(&api, &head, String::new(), Some(&trusted)));
        assert_eq!(r.status, 200, "{}", r.body);
        let sent = r.body.to_ascii_lowercase();
        assert!(
            sent.starts_with("delete /v1/appliances/x http/1.1\r\n"),
            "{}",
            r.body
        );
        assert!(sent.contains("\r\nx-dva-forwarded: 1\r\n"), "{}", r.body);
        assert!(
            sent.contains("\r\nauthorization: bearer t\r\n"),
            "{}",
            r.body
        );
        // A leader this CA did not vouch for is not told the token.
        let other = crate::pki::Pki::generate().expect("CA");
        let untrusted = crate::client::tls_client_config(other.ca_pem()).expect("client");
        let r = rt.block_on(forward(&api, &head, String::new(), Some(&untrusted)));
        assert_eq!(r.status, 503, "{}", r.body);
        assert!(r.body.contains("TLS handshake"), "{}", r.body);
        let got = leader.join().expect("leader");
        assert_eq!(got.len(), 1, "{got:?}");
    }

    #[test]
    fn replies_carry_their_headers() {
        let r = Reply::error(401, "unauthorized", "no".into());
        let h = r.headers(false);
        assert_eq!(h["www-authenticate"], "Bearer");
        assert_eq!(h["content-length"], r.body.len().to_string().as_str());
        assert_eq!(h["connection"], "close");
        assert_eq!(
            Reply::json(200, &1).headers(true)["connection"],
            "keep-alive"
        );
        let v: serde_json::Value = serde_json::from_str(&r.body).expect("json");
        assert_eq!(v["error"]["code"], "unauthorized");
        assert_eq!(v["error"]["message"], "no");
        let raw = String::from_utf8(raw_answer(&r)).expect("utf8");
        assert!(raw.starts_with("HTTP/1.1 401 Unauthorized\r\n"), "{raw}");
        assert!(raw.ends_with(&r.body), "{raw}");
    }
}
