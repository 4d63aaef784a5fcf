//! The unit channel's transport: TCP with mutual TLS (rustls, TLS 1.3, the `ring` provider).
//!
//! Every party holds a certificate issued by the installation's CA (see `dva_mgmt::pki`), and
//! its identity is the certificate's URI subject alternative name:
//! * `dva://APPLIANCE/unit/ID`: unit ID of an appliance (a manager unit's certificate also
//!   carries the DNS name `manager.APPLIANCE.dva`, which units check as the server name);
//! * `dva://mgmt`: the management tool, the only party whose desired state a manager takes.
//!
//! The channel is long-lived and full duplex: the manager's state machine writes configs while
//! a reader thread blocks on the socket. rustls connections are not split into halves, so
//! [`TlsReader`] reads the socket without holding the connection's lock and feeds what arrived
//! to the shared connection; [`TlsWriter`] encrypts under the lock and writes at once.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig};

/// How long a TLS handshake may take before the connection is dropped: a peer that connects
/// and says nothing must not hold a thread or a handshake slot.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a TCP connect may take. Peers are a network away, not a continent: a SYN not
/// answered within a second (the kernel's first retransmission) is a machine that is gone, and a
/// unit looking for its manager over several addresses must not wait on each dead one for the
/// whole handshake time.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Scheme of URI names in dva certificates.
const URI_SCHEME: &str = "dva://";

/// The URI name of unit `id` of `appliance`.
pub fn unit_uri(appliance: &str, id: u32) -> String {
    format!("{URI_SCHEME}{appliance}/unit/{id}")
}

/// The URI name of the management tool.
pub fn mgmt_uri() -> String {
    format!("{URI_SCHEME}mgmt")
}

/// The DNS name in a manager's certificate, which units verify as the server name.
pub fn manager_server_name(appliance: &str) -> String {
    format!("manager.{appliance}.dva")
}

/// Who is at the other end of a channel, as its certificate says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    Unit { appliance: String, id: u32 },
    Mgmt,
}

impl Peer {
    /// Parse a dva URI name; `None` for anything else.
    pub fn from_uri(uri: &str) -> Option<Peer> {
        let rest = uri.strip_prefix(URI_SCHEME)?;
        if rest == "mgmt" {
            return Some(Peer::Mgmt);
        }
        let (appliance, id) = rest.split_once("/unit/")?;
        if appliance.is_empty() || appliance.contains('/') {
            return None;
        }
        // Digits only: "+7" or " 7" would parse but are not what the CA writes.
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some(Peer::Unit {
            appliance: appliance.to_string(),
            id: id.parse().ok()?,
        })
    }

    /// The identity a (chain-verified) certificate carries: its one dva URI name.
    pub fn of_cert(cert: &CertificateDer<'_>) -> Result<Peer, String> {
        let ee = webpki::EndEntityCert::try_from(cert)
            .map_err(|e| format!("unreadable certificate: {e}"))?;
        let mut peers = ee.valid_uri_names().filter_map(Peer::from_uri);
        match (peers.next(), peers.next()) {
            (Some(p), None) => Ok(p),
            (None, _) => Err("the certificate names no dva identity".into()),
            // Two identities in one certificate would let its holder pick: refuse it.
            (Some(_), Some(_)) => Err("the certificate names several dva identities".into()),
        }
    }
}

/// Where a party's certificate, key and the installation CA are (PEM files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// A party's credentials, loaded: its chain, its key, and the CA it trusts.
pub struct Credentials {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub ca: Vec<CertificateDer<'static>>,
}

impl Credentials {
    pub fn load(files: &TlsFiles) -> io::Result<Credentials> {
        let certs = |p: &Path| -> io::Result<Vec<CertificateDer<'static>>> {
            let v = CertificateDer::pem_file_iter(p)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| invalid(format!("{}: {e}", p.display())))?;
            if v.is_empty() {
                return Err(invalid(format!("{}: no certificate", p.display())));
            }
            Ok(v)
        };
        let key = PrivateKeyDer::from_pem_file(&files.key)
            .map_err(|e| invalid(format!("{}: {e}", files.key.display())))?;
        Ok(Credentials {
            chain: certs(&files.cert)?,
            key,
            ca: certs(&files.ca)?,
        })
    }

    /// From PEM text (what the management tool holds in memory).
    pub fn from_pem(cert: &str, key: &str, ca: &str) -> io::Result<Credentials> {
        let certs = |pem: &str| -> io::Result<Vec<CertificateDer<'static>>> {
            CertificateDer::pem_slice_iter(pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| invalid(e.to_string()))
        };
        Ok(Credentials {
            chain: certs(cert)?,
            key: PrivateKeyDer::from_pem_slice(key.as_bytes())
                .map_err(|e| invalid(e.to_string()))?,
            ca: certs(ca)?,
        })
    }

    /// Our own identity, from our certificate.
    pub fn identity(&self) -> io::Result<Peer> {
        let leaf = self
            .chain
            .first()
            .ok_or_else(|| invalid("no certificate".into()))?;
        Peer::of_cert(leaf).map_err(invalid)
    }

    fn roots(&self) -> io::Result<RootCertStore> {
        let mut roots = RootCertStore::empty();
        for c in &self.ca {
            roots
                .add(c.clone())
                .map_err(|e| invalid(format!("CA certificate: {e}")))?;
        }
        Ok(roots)
    }

    /// A server that requires a client certificate chaining to our CA.
    pub fn server_config(&self) -> io::Result<Arc<ServerConfig>> {
        let provider = provider();
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(self.roots()?), provider.clone())
                .build()
                .map_err(|e| invalid(format!("client verifier: {e}")))?;
        let config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(io::Error::other)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| invalid(format!("our certificate and key: {e}")))?;
        Ok(Arc::new(config))
    }

    /// A client that presents our certificate and trusts only our CA.
    pub fn client_config(&self) -> io::Result<Arc<ClientConfig>> {
        let config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(io::Error::other)?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| invalid(format!("our certificate and key: {e}")))?;
        Ok(Arc::new(config))
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// A manager address: `tcp://HOST:PORT`.
pub fn parse_endpoint(s: &str) -> io::Result<SocketAddr> {
    let rest = s
        .strip_prefix("tcp://")
        .ok_or_else(|| invalid(format!("{s:?}: expected tcp://ADDR:PORT")))?;
    rest.to_socket_addrs()
        .map_err(|e| invalid(format!("{s:?}: {e}")))?
        .next()
        .ok_or_else(|| invalid(format!("{s:?} resolves to nothing")))
}

/// A comma-separated list of manager addresses (every host a manager may lead from).
pub fn parse_endpoints(s: &str) -> io::Result<Vec<SocketAddr>> {
    s.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(parse_endpoint)
        .collect()
}

/// Drive the handshake of `conn` on `sock` to its end, or fail once `deadline` has passed.
pub fn handshake(conn: &mut Connection, sock: &mut TcpStream, deadline: Instant) -> io::Result<()> {
    while conn.is_handshaking() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "TLS handshake timed out",
            ));
        }
        sock.set_read_timeout(Some(left))?;
        sock.set_write_timeout(Some(left))?;
        let (rd, wr) = conn.complete_io(sock)?;
        if rd == 0 && wr == 0 && conn.is_handshaking() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "peer closed during the TLS handshake",
            ));
        }
    }
    // complete_io may leave the last flight (e.g. the client's Finished) queued.
    while conn.wants_write() {
        conn.write_tls(sock)?;
    }
    sock.set_read_timeout(None)?;
    Ok(())
}

/// Connect to `addr` and complete a TLS handshake that checks the server's certificate names
/// `server_name` and chains to our CA.
pub fn connect(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    server_name: &str,
    timeout: Duration,
) -> io::Result<(TlsReader, TlsWriter)> {
    let name = ServerName::try_from(server_name.to_string())
        .map_err(|e| invalid(format!("server name {server_name:?}: {e}")))?;
    let deadline = Instant::now() + timeout;
    let mut sock = TcpStream::connect_timeout(&addr, timeout.min(CONNECT_TIMEOUT))?;
    sock.set_nodelay(true)?;
    let mut conn =
        Connection::Client(ClientConnection::new(config, name).map_err(io::Error::other)?);
    handshake(&mut conn, &mut sock, deadline)?;
    split(conn, sock)
}

/// The two halves of an established channel.
pub fn split(conn: Connection, sock: TcpStream) -> io::Result<(TlsReader, TlsWriter)> {
    let conn = Arc::new(Mutex::new(conn));
    let reader = TlsReader {
        conn: conn.clone(),
        sock: sock.try_clone()?,
        plain: Vec::new(),
        at: 0,
        buf: vec![0; 32 * 1024],
    };
    Ok((reader, TlsWriter { conn, sock }))
}

fn lock(conn: &Mutex<Connection>) -> io::Result<std::sync::MutexGuard<'_, Connection>> {
    conn.lock()
        .map_err(|_| io::Error::other("TLS connection poisoned"))
}

/// Plaintext in: reads the socket with no lock held, so writers are never blocked by a reader
/// waiting for the peer.
pub struct TlsReader {
    conn: Arc<Mutex<Connection>>,
    sock: TcpStream,
    /// Decrypted bytes not yet returned (`at` is how far they were).
    plain: Vec<u8>,
    at: usize,
    buf: Vec<u8>,
}

impl TlsReader {
    /// Bound how long a read waits for the peer (`None`: for ever).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.sock.set_read_timeout(t)
    }

    /// Close both directions (a writer of this stream fails from now on).
    pub fn shutdown(&self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }
}

impl Read for TlsReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.at < self.plain.len() {
                let n = out.len().min(self.plain.len() - self.at);
                out[..n].copy_from_slice(&self.plain[self.at..self.at + n]);
                self.at += n;
                return Ok(n);
            }
            self.plain.clear();
            self.at = 0;
            // What the handshake read past its end (a hello sent right after it) is already
            // decrypted and waiting.
            if drain(&mut *lock(&self.conn)?, &mut self.plain)? {
                return Ok(0);
            }
            if !self.plain.is_empty() {
                continue;
            }
            let n = self.sock.read(&mut self.buf)?;
            let mut c = lock(&self.conn)?;
            if n == 0 {
                // End of stream, with or without the peer's close_notify: the session is over.
                return Ok(0);
            }
            let mut input = &self.buf[..n];
            while !input.is_empty() {
                if c.read_tls(&mut input)? == 0 {
                    break;
                }
                if let Err(e) = c.process_new_packets() {
                    // Tell the peer why (an alert is queued), then give up on the stream.
                    let _ = c.write_tls(&mut &self.sock);
                    return Err(invalid(format!("TLS: {e}")));
                }
                // Drain the plaintext as it comes: rustls bounds what it buffers, our caller
                // (the line reader) bounds what it accepts.
                let closed = drain(&mut c, &mut self.plain)?;
                if closed && self.plain.is_empty() {
                    return Ok(0);
                }
            }
            // Anything rustls wants to say back (key updates) goes out now.
            while c.wants_write() {
                c.write_tls(&mut &self.sock)?;
            }
        }
    }
}

/// Move the connection's decrypted bytes to `plain`; `true` once the peer closed cleanly.
fn drain(c: &mut Connection, plain: &mut Vec<u8>) -> io::Result<bool> {
    let mut chunk = [0u8; 4096];
    loop {
        match c.reader().read(&mut chunk) {
            Ok(0) => return Ok(true),
            Ok(n) => plain.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e),
        }
    }
}

/// Plaintext out: encrypt under the lock and write through.
pub struct TlsWriter {
    conn: Arc<Mutex<Connection>>,
    sock: TcpStream,
}

impl TlsWriter {
    /// Close both directions (the reader sees the end of the stream).
    pub fn shutdown(&self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }

    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.sock.set_write_timeout(t)
    }

    /// Who the peer's certificate says it is (the chain was verified in the handshake).
    pub fn peer(&self) -> Result<Peer, String> {
        let c = self
            .conn
            .lock()
            .map_err(|_| "TLS connection poisoned".to_string())?;
        let cert = c
            .peer_certificates()
            .and_then(|certs| certs.first())
            .ok_or_else(|| "the peer presented no certificate".to_string())?;
        Peer::of_cert(cert)
    }
}

impl Write for TlsWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut c = lock(&self.conn)?;
        let mut rest = buf;
        // rustls takes plaintext only as far as its bounded send buffer has room (a config is
        // larger): encrypt a piece, send it, go on.
        while !rest.is_empty() {
            let n = c.writer().write(rest)?;
            rest = &rest[n..];
            let mut sent_any = n > 0;
            while c.wants_write() {
                sent_any |= c.write_tls(&mut &self.sock)? > 0;
            }
            if !sent_any {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "TLS connection takes no more data",
                ));
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let mut c = lock(&self.conn)?;
        while c.wants_write() {
            c.write_tls(&mut &self.sock)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_names_parse_to_identities() {
        assert_eq!(
            Peer::from_uri(&unit_uri("edge-fw", 7)),
            Some(Peer::Unit {
                appliance: "edge-fw".into(),
                id: 7
            })
        );
        assert_eq!(Peer::from_uri(&mgmt_uri()), Some(Peer::Mgmt));
        for bad in [
            "dva://edge-fw/unit/",
            "dva://edge-fw/unit/+7",
            "dva://edge-fw/unit/99999999999",
            "dva:///unit/1",
            "dva://a/b/unit/1",
            "https://edge-fw/unit/1",
            "dva://edge-fw/manager",
        ] {
            assert_eq!(Peer::from_uri(bad), None, "{bad}");
        }
    }

    #[test]
    fn endpoints_parse() {
        let v = parse_endpoints("tcp://127.0.0.1:7443, tcp://198.19.0.11:7443").unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[1].port(), 7443);
        assert!(parse_endpoint("/run/dva/manager.sock").is_err());
        assert!(parse_endpoint("tcp://nonsense").is_err());
    }
}
