//! The management API's client (what the CLI and tests use): one request per connection,
//! `Connection: close`, JSON in and out, streams (watch, capture, monitor) read as they come.
//! HTTP/1.1 is hyper's, on a small runtime of the client's own (the CLI is synchronous). Plain
//! HTTP over TCP, or https (tokio-rustls) trusting only the CA it is given: there are no system
//! roots here, a dva server's certificate comes from its installation CA or from the operator's
//! own.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::model::{ApplianceView, Event, ScaleRequest, UnitView};

#[derive(Debug, Clone)]
pub struct Client {
    /// host:port
    authority: String,
    /// The host of `authority`, which the server's certificate must name (https).
    host: String,
    /// https: the TLS configuration, trusting the CA given.
    tls: Option<Arc<rustls::ClientConfig>>,
    token: Option<String>,
    timeout: Duration,
    /// Drives the connections (shared by the clones of this client).
    runtime: Arc<tokio::runtime::Runtime>,
}

/// An answer that is not 2xx: the status and the server's message.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct HttpError {
    pub status: u16,
    pub code: String,
    pub message: String,
    /// `not_leader`: where the leading replica is (`scheme://host:port`).
    pub leader: Option<String>,
}

impl Client {
    /// `server` is `http://host:port` (or `host:port`), or `https://host:port` trusting the CA
    /// in the file `$DVA_CA_FILE`.
    pub fn new(server: &str, token: Option<String>) -> anyhow::Result<Client> {
        Client::with_ca(server, token, None)
    }

    /// [`Client::new`]; over https trusting `ca_pem` (PEM certificates) if given, else the CA in
    /// the file `$DVA_CA_FILE`, else refusing (no system roots: see the module doc).
    pub fn with_ca(
        server: &str,
        token: Option<String>,
        ca_pem: Option<&str>,
    ) -> anyhow::Result<Client> {
        let s = server.trim().trim_end_matches('/');
        let (https, authority) = match s.strip_prefix("https://") {
            Some(a) => (true, a),
            None => (false, s.strip_prefix("http://").unwrap_or(s)),
        };
        if authority.is_empty() || authority.contains('/') {
            bail!("invalid server address {server:?} (expected http://host:port or https://host:port)");
        }
        let host = host_of(authority);
        let tls = if https {
            let ca = match (ca_pem, std::env::var_os("DVA_CA_FILE")) {
                (Some(pem), _) => pem.to_string(),
                (None, Some(path)) => std::fs::read_to_string(&path).with_context(|| {
                    format!("reading the CA file {} (DVA_CA_FILE)", path.to_string_lossy())
                })?,
                (None, None) => bail!(
                    "{server}: https needs the CA that issued the server's certificate: pass --ca FILE or set DVA_CA_FILE (the client file `dva serve --tls-auto` writes has it)"
                ),
            };
            Some(tls_client_config(&ca).context("the CA to trust")?)
        } else {
            None
        };
        Ok(Client {
            authority: authority.to_string(),
            host: host.to_string(),
            tls,
            token,
            // A delete waits for the units to stop (up to ~5 s).
            timeout: Duration::from_secs(30),
            runtime: Arc::new(
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("starting the client's runtime")?,
            ),
        })
    }

    /// Send one request and wait (`timeout` at most) for the answer's head.
    async fn send(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: &[u8],
        timeout: Duration,
    ) -> anyhow::Result<http::Response<Incoming>> {
        let addr = self
            .authority
            .to_socket_addrs()
            .with_context(|| format!("resolving {}", self.authority))?
            .next()
            .ok_or_else(|| anyhow!("{} resolves to nothing", self.authority))?;
        let mut req = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, &self.authority)
            .header(http::header::CONNECTION, "close")
            .header(http::header::ACCEPT, "application/json");
        if !body.is_empty() {
            req = req.header(http::header::CONTENT_TYPE, content_type);
        }
        if let Some(t) = &self.token {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = req
            .body(Full::new(Bytes::copy_from_slice(body)))
            .with_context(|| format!("{method} {path} is not a request"))?;
        let exchange = exchange(
            Callee::Api,
            addr,
            &self.host,
            self.tls.as_ref(),
            CONNECT_TIMEOUT,
            req,
        );
        tokio::time::timeout(timeout, exchange).await.map_err(|_| {
            anyhow!(
                "no answer from the management API at {addr} within {} s",
                timeout.as_secs()
            )
        })?
    }

    /// Send one request; `Ok((status, body))` whatever the status.
    pub fn raw(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: &[u8],
    ) -> anyhow::Result<(u16, String)> {
        self.runtime.block_on(async {
            let resp = self
                .send(method, path, content_type, body, self.timeout)
                .await?;
            let status = resp.status().as_u16();
            let body = tokio::time::timeout(self.timeout, resp.into_body().collect())
                .await
                .map_err(|_| anyhow!("the answer did not arrive within {:?}", self.timeout))?
                .context("reading the response")?
                .to_bytes();
            Ok((status, String::from_utf8_lossy(&body).into_owned()))
        })
    }

    fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: &[u8],
    ) -> anyhow::Result<T> {
        let (status, text) = self.raw(method, path, content_type, body)?;
        if !(200..300).contains(&status) {
            return Err(HttpError::of(status, &text).into());
        }
        serde_json::from_str(&text).with_context(|| format!("unexpected answer to {method} {path}"))
    }

    pub fn apply(&self, spec: &str) -> anyhow::Result<ApplianceView> {
        self.call(
            "POST",
            "/v1/appliances",
            "application/yaml",
            spec.as_bytes(),
        )
    }
    /// What applying `spec` would do (`?dryRun=All`): checked by the server, nothing changed.
    pub fn apply_dry_run(&self, spec: &str) -> anyhow::Result<ApplianceView> {
        self.call(
            "POST",
            "/v1/appliances?dryRun=All",
            "application/yaml",
            spec.as_bytes(),
        )
    }
    pub fn list(&self) -> anyhow::Result<Vec<ApplianceView>> {
        self.call("GET", "/v1/appliances", "", b"")
    }
    pub fn get(&self, name: &str) -> anyhow::Result<ApplianceView> {
        self.call("GET", &format!("/v1/appliances/{name}"), "", b"")
    }
    pub fn delete(&self, name: &str) -> anyhow::Result<serde_json::Value> {
        self.call("DELETE", &format!("/v1/appliances/{name}"), "", b"")
    }
    pub fn scale(&self, name: &str, req: &ScaleRequest) -> anyhow::Result<ApplianceView> {
        let body = serde_json::to_vec(req)?;
        self.call(
            "POST",
            &format!("/v1/appliances/{name}/scale"),
            "application/json",
            &body,
        )
    }
    /// The registered hosts (`GET /v1/hosts`).
    pub fn hosts(&self) -> anyhow::Result<Vec<crate::hosts::HostView>> {
        self.call("GET", "/v1/hosts", "", b"")
    }
    /// A one-time join token for `dva agent` (`POST /v1/join-tokens`).
    pub fn join_token(&self) -> anyhow::Result<crate::hosts::JoinToken> {
        self.call("POST", "/v1/join-tokens", "", b"")
    }
    pub fn remove_host(&self, name: &str) -> anyhow::Result<serde_json::Value> {
        self.call("DELETE", &format!("/v1/hosts/{name}"), "", b"")
    }
    pub fn units(&self, name: &str) -> anyhow::Result<Vec<UnitView>> {
        self.call("GET", &format!("/v1/appliances/{name}/units"), "", b"")
    }
    pub fn events(&self, name: &str) -> anyhow::Result<Vec<Event>> {
        self.call("GET", &format!("/v1/appliances/{name}/events"), "", b"")
    }
    /// `query`: a flow filter (see `dva_unit::inspect::FlowFilter::to_query`).
    /// Every unit's counters, read from the units now (rates are two reads apart).
    pub fn stats(&self, name: &str) -> anyhow::Result<crate::model::StatsView> {
        self.call("GET", &format!("/v1/appliances/{name}/stats"), "", b"")
    }
    pub fn flows(&self, name: &str, query: &str) -> anyhow::Result<crate::inspect::FlowsView> {
        self.call(
            "GET",
            &format!("/v1/appliances/{name}/flows?{query}"),
            "",
            b"",
        )
    }
    /// `GET path` whose answer is streamed into `out` (a capture): the bytes written, or the
    /// server's error. `timeout`: how long a read may wait (a capture can be quiet for its
    /// whole duration).
    pub fn download(
        &self,
        path: &str,
        out: &mut dyn std::io::Write,
        timeout: Duration,
    ) -> anyhow::Result<u64> {
        self.runtime.block_on(async {
            let resp = self.send("GET", path, "", b"", timeout).await?;
            let status = resp.status().as_u16();
            let mut body = resp.into_body();
            if status != 200 {
                let text = http_body_util::Limited::new(body, 64 * 1024)
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                return Err(HttpError::of(status, &String::from_utf8_lossy(&text)).into());
            }
            let mut written = 0u64;
            loop {
                let frame = tokio::time::timeout(timeout, body.frame())
                    .await
                    .map_err(|_| anyhow!("nothing from the server for {} s", timeout.as_secs()))?;
                let Some(frame) = frame else {
                    return Ok(written);
                };
                if let Ok(data) = frame.context("reading the stream")?.into_data() {
                    out.write_all(&data)?;
                    out.flush()?;
                    written += data.len() as u64;
                }
            }
        })
    }

    /// [`Client::download`] from the leading replica: a replica that does not lead answers a
    /// stream (watch, capture, monitor) with 503 `not_leader` and the leader's URL, which is
    /// followed once, with the same token and trust (replicas share both).
    pub fn download_from_leader(
        &self,
        path: &str,
        out: &mut dyn std::io::Write,
        timeout: Duration,
    ) -> anyhow::Result<u64> {
        match self.download(path, out, timeout) {
            Err(e) => {
                let Some(url) = e
                    .downcast_ref::<HttpError>()
                    .filter(|h| h.status == 503 && h.code == "not_leader")
                    .and_then(|h| h.leader.clone())
                else {
                    return Err(e);
                };
                let leader = self.at(&url)?;
                leader.download(path, out, timeout)
            }
            r => r,
        }
    }

    /// This client aimed at another replica (`scheme://host:port`): same token, same trust. The
    /// scheme must be this client's (a replica never sends us from https to http).
    fn at(&self, url: &str) -> anyhow::Result<Client> {
        let (https, authority) = match url.strip_prefix("https://") {
            Some(a) => (true, a),
            None => (false, url.strip_prefix("http://").unwrap_or(url)),
        };
        if https != self.tls.is_some() || authority.is_empty() || authority.contains('/') {
            bail!("the replica named {url:?} as the leader: not a server this client can follow");
        }
        Ok(Client {
            authority: authority.to_string(),
            host: host_of(authority).to_string(),
            ..self.clone()
        })
    }
    /// Follow a watch (`path` with `?watch=true`): `on` gets each event's type (`ADDED`,
    /// `MODIFIED`, `DELETED`) and object as they arrive; returns when the server ends the watch
    /// (its `timeoutSeconds`, or the watched appliance deleted) or `on` fails.
    pub fn watch(
        &self,
        path: &str,
        timeout: Duration,
        on: &mut dyn FnMut(&str, serde_json::Value) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        struct Lines<'a> {
            pending: Vec<u8>,
            on: &'a mut dyn FnMut(&str, serde_json::Value) -> anyhow::Result<()>,
        }
        impl std::io::Write for Lines<'_> {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.pending.extend_from_slice(buf);
                while let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = self.pending.drain(..=end).collect();
                    let v: serde_json::Value = match serde_json::from_slice(&line) {
                        Ok(v) => v,
                        Err(_) => continue,
                    };
                    let kind = v["type"].as_str().unwrap_or("").to_string();
                    (self.on)(&kind, v["object"].clone()).map_err(std::io::Error::other)?;
                }
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut lines = Lines {
            pending: Vec::new(),
            on,
        };
        self.download_from_leader(path, &mut lines, timeout)?;
        Ok(())
    }
    pub fn unit_config(&self, name: &str, unit: u32) -> anyhow::Result<serde_json::Value> {
        self.call(
            "GET",
            &format!("/v1/appliances/{name}/units/{unit}/config"),
            "",
            b"",
        )
    }
}

/// The host part of `host:port` (`[v6]:port` too), which a server certificate names.
fn host_of(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    authority
        .rsplit_once(':')
        .map_or(authority, |(host, _)| host)
}

/// A TLS client configuration trusting only the certificates in `ca_pem`: TLS 1.3 and 1.2, the
/// `ring` provider, HTTP/1.1 by ALPN.
pub fn tls_client_config(ca_pem: &str) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let cert = cert.map_err(|e| anyhow!("not a PEM certificate: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| anyhow!("not a usable CA certificate: {e}"))?;
    }
    if roots.is_empty() {
        bail!("no certificate (PEM) found");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// How long connecting (and a TLS handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

impl HttpError {
    /// A non-2xx answer: the server's JSON error, or its text if it sent something else.
    fn of(status: u16, text: &str) -> HttpError {
        let v: serde_json::Value = serde_json::from_str(text).unwrap_or_default();
        HttpError {
            status,
            code: v["error"]["code"].as_str().unwrap_or("").to_string(),
            message: v["error"]["message"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| format!("HTTP {status}: {}", text.trim())),
            leader: v["error"]["leader"].as_str().map(str::to_string),
        }
    }
}

/// Who is called, as the messages of a failure to reach it say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Callee {
    /// A management API (`dva serve`): the hints name what the operator can check.
    Api,
    /// A `dva agent`, called with the management tool's certificate.
    Agent,
}

impl Callee {
    fn unreachable(self, addr: SocketAddr) -> String {
        match self {
            Callee::Api => {
                format!("connecting to the management API at {addr} (is `dva serve` running?)")
            }
            Callee::Agent => format!("connecting to the agent at {addr}"),
        }
    }

    fn handshake_failed(self, addr: SocketAddr, host: &str) -> String {
        match self {
            Callee::Api => format!(
                "TLS handshake with the management API at {addr} (is it https, and does the CA given by --ca, DVA_CA_FILE or the client file issue its certificate for {host}?)"
            ),
            Callee::Agent => format!(
                "TLS handshake with the agent at {addr} (does the installation CA issue its certificate for {host}?)"
            ),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Callee::Api => "the management API",
            Callee::Agent => "the agent",
        }
    }
}

/// Send `req` to `callee` at `addr` on a new connection, within `connect_timeout` to connect;
/// with `tls`, over TLS checking that the server's certificate names `host` and chains to the
/// CA trusted. A failed handshake says so (a wrong CA, most likely), not that the server is
/// down; an answer that is not HTTP says the server may want https.
pub(crate) async fn exchange(
    callee: Callee,
    addr: SocketAddr,
    host: &str,
    tls: Option<&Arc<rustls::ClientConfig>>,
    connect_timeout: Duration,
    req: http::Request<Full<Bytes>>,
) -> anyhow::Result<http::Response<Incoming>> {
    let connected = tokio::time::timeout(connect_timeout, tokio::net::TcpStream::connect(addr))
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
        .with_context(|| callee.unreachable(addr))?;
    let _ = connected.set_nodelay(true);
    let Some(config) = tls else {
        return send_over(connected, req).await.map_err(|e| {
            if e.is_parse() || e.is_incomplete_message() {
                anyhow!(e).context(USE_HTTPS)
            } else {
                anyhow!(e).context(format!("{} at {addr}", callee.name()))
            }
        });
    };
    let name = rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| anyhow!("{host:?} is not a server name for TLS: {e}"))?;
    let handshake = tokio_rustls::TlsConnector::from(config.clone()).connect(name, connected);
    let stream = tokio::time::timeout(connect_timeout, handshake)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
        .with_context(|| callee.handshake_failed(addr, host))?;
    send_over(stream, req)
        .await
        .with_context(|| format!("{} at {addr}", callee.name()))
}

/// A whole answer: its status, content type and body.
pub(crate) struct Answer {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: String,
}

/// [`exchange`], then the answer's body, at most `limit` bytes of it (the other end could be
/// anything listening there).
pub(crate) async fn exchange_whole(
    callee: Callee,
    addr: SocketAddr,
    tls: Option<&Arc<rustls::ClientConfig>>,
    connect_timeout: Duration,
    req: http::Request<Full<Bytes>>,
    limit: usize,
) -> anyhow::Result<Answer> {
    // Replicas and agents are dialled by address, and their certificates name it.
    let host = addr.ip().to_string();
    let resp = exchange(callee, addr, &host, tls, connect_timeout, req).await?;
    let status = resp.status().as_u16();
    let content_type = resp
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = http_body_util::Limited::new(resp.into_body(), limit)
        .collect()
        .await
        .map_err(|e| anyhow!("reading the answer of {} at {addr}: {e}", callee.name()))?
        .to_bytes();
    Ok(Answer {
        status,
        content_type,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// Run `f` to its end on a runtime of its own: for the synchronous callers of [`exchange`] that
/// hold no client (the engine's calls to agents, from its own threads).
pub(crate) fn block_on<F: std::future::Future>(f: F) -> anyhow::Result<F::Output> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a runtime for the call")?;
    Ok(runtime.block_on(f))
}

/// One request on a connection of its own (driven by a task until its answer is read).
async fn send_over<S>(
    io: S,
    req: http::Request<Full<Bytes>>,
) -> Result<http::Response<Incoming>, hyper::Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io)).await?;
    tokio::spawn(conn);
    sender.send_request(req).await
}

/// What a plain request to a TLS port gets (a TLS alert, or the connection closed unanswered).
const USE_HTTPS: &str = "the server did not answer in HTTP: if it speaks TLS, use https://HOST:PORT (and --ca or DVA_CA_FILE)";

#[cfg(test)]
mod tests {
    use super::*;

    /// An error answer's message is the server's; other text is shown as it came.
    #[test]
    fn error_answers_carry_the_servers_message() {
        let e = HttpError::of(
            503,
            r#"{"error": {"code": "not_leader", "message": "ask x", "leader": "https://x:1"}}"#,
        );
        assert_eq!(
            (e.status, e.code.as_str(), e.message.as_str()),
            (503, "not_leader", "ask x")
        );
        assert_eq!(e.leader.as_deref(), Some("https://x:1"));
        let e = HttpError::of(502, "bad gateway\n");
        assert_eq!(e.message, "HTTP 502: bad gateway");
        assert!(Client::new("http://127.0.0.1:7080/", None).is_ok());
    }

    #[test]
    fn https_needs_a_ca_to_trust() {
        let ca = crate::pki::Pki::generate().unwrap();
        let c = Client::with_ca("https://127.0.0.1:7443/", None, Some(ca.ca_pem())).unwrap();
        assert_eq!(
            (c.authority.as_str(), c.host.as_str()),
            ("127.0.0.1:7443", "127.0.0.1")
        );
        assert!(c.tls.is_some());
        let v6 = Client::with_ca("https://[::1]:7443", None, Some(ca.ca_pem())).unwrap();
        assert_eq!(v6.host, "::1");
        assert!(Client::with_ca("https://x:1", None, Some("not a certificate")).is_err());
        // A CA given to a plain http client is not needed, and not an error.
        let plain = Client::with_ca("http://127.0.0.1:7080", None, Some(ca.ca_pem())).unwrap();
        assert!(plain.tls.is_none());
        if std::env::var_os("DVA_CA_FILE").is_none() {
            let e = Client::new("https://x:1", None).unwrap_err().to_string();
            assert!(e.contains("--ca") && e.contains("DVA_CA_FILE"), "{e}");
        }
        assert_eq!(host_of("dva.example:7080"), "dva.example");
    }
}
