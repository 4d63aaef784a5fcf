//! A small HTTP/1.1 client for the management API (what the CLI and tests use): one request per
//! connection, `Connection: close`, JSON in and out. Plain HTTP over TCP, or https (rustls)
//! trusting only the CA it is given: there are no system roots here, a dva server's certificate
//! comes from its installation CA or from the operator's own.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde::de::DeserializeOwned;

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
        })
    }

    /// A connection to the server, over TLS for https; reads wait `read_timeout` at most.
    fn open(&self, read_timeout: Duration) -> anyhow::Result<ClientStream> {
        let addr = self
            .authority
            .to_socket_addrs()
            .with_context(|| format!("resolving {}", self.authority))?
            .next()
            .ok_or_else(|| anyhow!("{} resolves to nothing", self.authority))?;
        let s = connect(addr, &self.host, self.tls.as_ref(), Duration::from_secs(5))?;
        s.tcp().set_read_timeout(Some(read_timeout))?;
        s.tcp().set_write_timeout(Some(self.timeout))?;
        Ok(s)
    }

    /// Send one request; `Ok((status, body))` whatever the status.
    pub fn raw(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: &[u8],
    ) -> anyhow::Result<(u16, String)> {
        let mut s = self.open(self.timeout)?;
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nAccept: application/json\r\nContent-Length: {}\r\n",
            self.authority,
            body.len()
        );
        if !body.is_empty() {
            head += &format!("Content-Type: {content_type}\r\n");
        }
        if let Some(t) = &self.token {
            head += &format!("Authorization: Bearer {t}\r\n");
        }
        head += "\r\n";
        s.write_all(head.as_bytes())?;
        s.write_all(body)?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).context("reading the response")?;
        parse_response(&raw)
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
            let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            return Err(HttpError {
                status,
                code: v["error"]["code"].as_str().unwrap_or("").to_string(),
                message: v["error"]["message"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("HTTP {status}: {}", text.trim())),
                leader: v["error"]["leader"].as_str().map(str::to_string),
            }
            .into());
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
        let mut s = self.open(timeout)?;
        let mut head = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
            self.authority
        );
        if let Some(t) = &self.token {
            head += &format!("Authorization: Bearer {t}\r\n");
        }
        head += "\r\n";
        s.write_all(head.as_bytes())?;
        let mut r = std::io::BufReader::new(s);
        let mut got = Vec::new();
        {
            use std::io::BufRead;
            let mut limited = (&mut r).take(16 * 1024);
            loop {
                let before = got.len();
                if limited.read_until(b'\n', &mut got)? == 0 {
                    if speaks_tls(&got) {
                        bail!(USE_HTTPS);
                    }
                    bail!("the server closed the connection before answering");
                }
                if got[before..] == *b"\r\n" {
                    break;
                }
            }
        }
        let text = String::from_utf8_lossy(&got);
        let status: u16 = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("malformed HTTP status line"))?;
        if status != 200 {
            let mut body = String::new();
            let _ = (&mut r).take(64 * 1024).read_to_string(&mut body);
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            return Err(HttpError {
                status,
                code: v["error"]["code"].as_str().unwrap_or("").to_string(),
                message: v["error"]["message"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("HTTP {status}: {}", body.trim())),
                leader: v["error"]["leader"].as_str().map(str::to_string),
            }
            .into());
        }
        Ok(std::io::copy(&mut r, out)?)
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

/// A connection to a management API: TCP, or TLS over it.
pub(crate) enum ClientStream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl ClientStream {
    pub(crate) fn tcp(&self) -> &TcpStream {
        match self {
            ClientStream::Plain(s) => s,
            ClientStream::Tls(t) => t.get_ref(),
        }
    }
}

impl Read for ClientStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            ClientStream::Plain(s) => s.read(buf),
            ClientStream::Tls(t) => t.read(buf),
        }
    }
}

impl Write for ClientStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            ClientStream::Plain(s) => s.write(buf),
            ClientStream::Tls(t) => t.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            ClientStream::Plain(s) => s.flush(),
            ClientStream::Tls(t) => t.flush(),
        }
    }
}

/// Connect to the API at `addr`, within `timeout`; with `tls`, also complete the handshake,
/// which checks that the server's certificate names `host` and chains to the CA trusted. A
/// failed handshake says so (a wrong CA, most likely), not that the server is down.
pub(crate) fn connect(
    addr: SocketAddr,
    host: &str,
    tls: Option<&Arc<rustls::ClientConfig>>,
    timeout: Duration,
) -> anyhow::Result<ClientStream> {
    let mut sock = TcpStream::connect_timeout(&addr, timeout).with_context(|| {
        format!("connecting to the management API at {addr} (is `dva serve` running?)")
    })?;
    let Some(config) = tls else {
        return Ok(ClientStream::Plain(sock));
    };
    let name = rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| anyhow!("{host:?} is not a server name for TLS: {e}"))?;
    let mut conn = rustls::ClientConnection::new(config.clone(), name)?;
    let deadline = Instant::now() + timeout;
    let failed = || {
        format!(
            "TLS handshake with the management API at {addr} (is it https, and does the CA given by --ca, DVA_CA_FILE or the client file issue its certificate for {host}?)"
        )
    };
    while conn.is_handshaking() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(anyhow!("timed out")).with_context(failed);
        }
        sock.set_read_timeout(Some(left))?;
        sock.set_write_timeout(Some(left))?;
        conn.complete_io(&mut sock).with_context(failed)?;
    }
    Ok(ClientStream::Tls(Box::new(rustls::StreamOwned::new(
        conn, sock,
    ))))
}

/// A TLS alert record (what a TLS server answers plain HTTP with): the server wants https.
fn speaks_tls(raw: &[u8]) -> bool {
    raw.starts_with(&[0x15, 0x03])
}

const USE_HTTPS: &str = "the server speaks TLS: use https://HOST:PORT (and --ca or DVA_CA_FILE)";

fn parse_response(raw: &[u8]) -> anyhow::Result<(u16, String)> {
    if speaks_tls(raw) {
        bail!(USE_HTTPS);
    }
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow!("malformed HTTP response (no header end)"))?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("malformed HTTP status line"))?;
    let chunked = lines.any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let mut body = raw[split + 4..].to_vec();
    if chunked {
        body = dechunk(&body)?;
    }
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn dechunk(mut b: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = b
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| anyhow!("malformed chunked body"))?;
        let size_text = String::from_utf8_lossy(&b[..eol]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| anyhow!("malformed chunk size {size_text:?}"))?;
        b = &b[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        let chunk = b.get(..size).ok_or_else(|| anyhow!("truncated chunk"))?;
        out.extend_from_slice(chunk);
        b = b.get(size + 2..).unwrap_or(&[]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked_responses() {
        let (s, b) = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").unwrap();
        assert_eq!((s, b.as_str()), (200, "ok"));
        let (s, b) = parse_response(
            b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((s, b.as_str()), (404, "abcde"));
        assert!(parse_response(b"garbage").is_err());
        let e = parse_response(b"\x15\x03\x03\x00\x02\x02\x32").unwrap_err();
        assert!(e.to_string().contains("https://"), "{e}");
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
