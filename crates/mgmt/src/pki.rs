//! The installation's PKI: one CA per management tool's state directory, made on first need,
//! which issues a certificate to every unit it starts and one to the management tool itself.
//! The unit channel ([`dva_unit::tls`]) accepts only certificates of this CA, so a process that
//! can reach a manager's port but was not started by this installation cannot join, and the
//! backplane keys the manager hands out reach only units it started.
//!
//! * CA: ECDSA P-256, [`CA_VALIDITY`], `ca.crt` and `ca.key` in `<state>/pki/` (0700 directory,
//!   0600 files). The key never leaves the management tool.
//! * Units: a fresh key and a certificate for every start, valid [`LEAF_VALIDITY`], naming
//!   `dva://APPLIANCE/unit/ID` (URI) and `unit-ID.APPLIANCE.dva` (DNS); a manager's also names
//!   `manager.APPLIANCE.dva`, the server name units check. The provisioner writes them into the
//!   unit's private directory ([`write_unit_files`]).
//! * The management tool: `dva://mgmt`, held in memory, issued when it opens.
//! * The API server (`dva serve --tls-auto`): a server-only certificate naming the addresses and
//!   host names clients reach it by, valid [`SERVER_VALIDITY`], `api.crt` and `api.key` in
//!   `<state>/pki/` ([`write_server_files`]). It names no dva identity, so it cannot join a
//!   unit channel.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

use dva_unit::tls::{self, TlsFiles};

/// How long the CA is valid. Rotating it means re-issuing every unit's certificate.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 86_400);
/// How long a unit's certificate is valid: units get a new one whenever they are (re)started.
pub const LEAF_VALIDITY: Duration = Duration::from_secs(90 * 86_400);
/// How long the API server's certificate is valid: issued anew at every start, but a `dva serve`
/// may run for a long time, so longer than a unit's; not longer than browsers accept (397 days).
pub const SERVER_VALIDITY: Duration = Duration::from_secs(397 * 86_400);
/// Certificates start this long before they are issued, for clocks a little behind ours.
const BACKDATE: Duration = Duration::from_secs(300);

const CA_COMMON_NAME: &str = "dva installation CA";

/// A party's credentials as PEM text: what a provisioner hands to the unit it starts.
#[derive(Clone, PartialEq, Eq)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
}

impl std::fmt::Debug for Issued {
    // The key stays out of logs and error messages.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued").finish_non_exhaustive()
    }
}

pub struct Pki {
    /// The CA as an issuer: rcgen signs with its distinguished name and key, which are what the
    /// stored certificate holds too.
    issuer: rcgen::Certificate,
    key: KeyPair,
    ca_pem: String,
}

/// What the CA certificate says; rebuilt the same way when the key is loaded, so leaves name the
/// stored certificate as their issuer.
fn ca_params(now: time::OffsetDateTime) -> Result<CertificateParams, rcgen::Error> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_COMMON_NAME);
    p.distinguished_name = dn;
    // Leaves only below it: no intermediate CAs.
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.not_before = now - BACKDATE;
    p.not_after = now + CA_VALIDITY;
    Ok(p)
}

impl Pki {
    /// A new CA in memory (tests, and [`Pki::open`] on first use).
    pub fn generate() -> anyhow::Result<Pki> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let cert = ca_params(time::OffsetDateTime::now_utc())?.self_signed(&key)?;
        let ca_pem = cert.pem();
        Ok(Pki {
            issuer: cert,
            key,
            ca_pem,
        })
    }

    /// The CA kept in `dir` (`ca.crt`, `ca.key`), made there if there is none.
    pub fn open(dir: &Path) -> anyhow::Result<Pki> {
        let (crt, key) = (dir.join("ca.crt"), dir.join("ca.key"));
        if crt.exists() && key.exists() {
            let ca_pem = std::fs::read_to_string(&crt)
                .with_context(|| format!("reading {}", crt.display()))?;
            let key_pem = std::fs::read_to_string(&key)
                .with_context(|| format!("reading {}", key.display()))?;
            let kp = KeyPair::from_pem(&key_pem)
                .with_context(|| format!("{}: not a private key", key.display()))?;
            let issuer = ca_params(time::OffsetDateTime::now_utc())?.self_signed(&kp)?;
            return Ok(Pki {
                issuer,
                key: kp,
                ca_pem,
            });
        }
        let pki = Pki::generate()?;
        dva_io::local::create_private_dir_all(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        // Key first: a crash in between leaves no certificate without its key.
        write_private(&key, &pki.key.serialize_pem())?;
        write_private(&crt, &pki.ca_pem)?;
        Ok(pki)
    }

    /// The CA's certificate and key in one PEM text, to share between replicas.
    pub fn bundle(&self) -> String {
        format!("{}{}", self.ca_pem, self.key.serialize_pem())
    }

    /// The CA of [`Pki::bundle`]'s text, written to `dir` (so a restart without etcd keeps it).
    pub fn from_bundle(dir: &Path, bundle: &str) -> anyhow::Result<Pki> {
        const END_CERT: &str = "-----END CERTIFICATE-----";
        let at = bundle
            .find(END_CERT)
            .context("the shared CA holds no certificate")?
            + END_CERT.len();
        let (ca_pem, key_pem) = bundle.split_at(at);
        let ca_pem = format!("{}\n", ca_pem.trim());
        let kp = KeyPair::from_pem(key_pem.trim()).context("the shared CA's key")?;
        let issuer = ca_params(time::OffsetDateTime::now_utc())?.self_signed(&kp)?;
        dva_io::local::create_private_dir_all(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        write_private(&dir.join("ca.key"), &kp.serialize_pem())?;
        write_private(&dir.join("ca.crt"), &ca_pem)?;
        Ok(Pki {
            issuer,
            key: kp,
            ca_pem,
        })
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    fn issue(&self, uri: String, dns: Vec<String>) -> anyhow::Result<Issued> {
        let mut p = CertificateParams::new(dns)?;
        p.subject_alt_names
            .push(SanType::URI(uri.as_str().try_into()?));
        // Every party is a client of the channel; a manager is also its server.
        let eku = vec![
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::ServerAuth,
        ];
        self.sign(p, &uri, eku, LEAF_VALIDITY)
    }

    /// Sign a leaf certificate of `p`'s names with a fresh key: common name `cn`, extended key
    /// usages `eku`, valid from a little before now for `validity`.
    fn sign(
        &self,
        mut p: CertificateParams,
        cn: &str,
        eku: Vec<ExtendedKeyUsagePurpose>,
        validity: Duration,
    ) -> anyhow::Result<Issued> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        p.distinguished_name = dn;
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = eku;
        p.use_authority_key_identifier_extension = true;
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - BACKDATE;
        p.not_after = now + validity;
        let cert = p.signed_by(&key, &self.issuer, &self.key)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            ca_pem: self.ca_pem.clone(),
        })
    }

    /// Unit `id` of `appliance`; a manager's certificate also names the manager's server name.
    pub fn issue_unit(&self, appliance: &str, id: u32, manager: bool) -> anyhow::Result<Issued> {
        let mut dns = vec![format!("unit-{id}.{appliance}.dva")];
        if manager {
            dns.push(tls::manager_server_name(appliance));
        }
        self.issue(tls::unit_uri(appliance, id), dns)
            .with_context(|| format!("issuing the certificate of unit {id} of {appliance}"))
    }

    /// The API server's certificate, naming `names` (IP addresses and DNS names, as the clients
    /// dial it): for TLS server authentication only.
    pub fn issue_server(&self, names: &[String]) -> anyhow::Result<Issued> {
        let mut unique: Vec<String> = Vec::new();
        for n in names.iter().map(|n| n.trim()).filter(|n| !n.is_empty()) {
            if !unique.iter().any(|u| u.eq_ignore_ascii_case(n)) {
                unique.push(n.to_string());
            }
        }
        anyhow::ensure!(!unique.is_empty(), "a server certificate needs a name");
        let p = CertificateParams::new(unique.clone())
            .with_context(|| format!("server names {unique:?}"))?;
        self.sign(
            p,
            "dva API server",
            vec![ExtendedKeyUsagePurpose::ServerAuth],
            SERVER_VALIDITY,
        )
        .context("issuing the API server's certificate")
    }

    /// An agent's certificate: it serves the agent's API, so it names the address the management
    /// tool dials (an IP address SAN) and `dva://host/NAME`, which is no unit's or the tool's
    /// identity (an agent cannot join a unit channel with it).
    pub fn issue_agent(&self, host: &str, addr: std::net::IpAddr) -> anyhow::Result<Issued> {
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.subject_alt_names.push(SanType::IpAddress(addr));
        let uri = format!("dva://host/{host}");
        p.subject_alt_names
            .push(SanType::URI(uri.as_str().try_into()?));
        self.sign(
            p,
            &uri,
            vec![ExtendedKeyUsagePurpose::ServerAuth],
            SERVER_VALIDITY,
        )
        .with_context(|| format!("issuing the certificate of host {host}'s agent"))
    }

    /// The management tool's client certificate.
    pub fn issue_mgmt(&self) -> anyhow::Result<Issued> {
        self.issue(tls::mgmt_uri(), Vec::new())
            .context("issuing the management tool's certificate")
    }
}

/// Write a unit's credentials into its private directory `dir` (made 0700; files 0600) and
/// return their paths, for `--tls-cert`, `--tls-key` and `--tls-ca`.
pub fn write_unit_files(dir: &Path, issued: &Issued) -> anyhow::Result<TlsFiles> {
    dva_io::local::create_private_dir_all(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    // A directory kept from an earlier run keeps its mode through mkdir: tighten it.
    std::fs::set_permissions(
        dir,
        std::fs::Permissions::from_mode(dva_io::local::DIR_MODE),
    )
    .with_context(|| format!("restricting {}", dir.display()))?;
    let files = TlsFiles {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
        ca: dir.join("ca.pem"),
    };
    write_private(&files.key, &issued.key_pem)?;
    write_private(&files.cert, &issued.cert_pem)?;
    write_private(&files.ca, &issued.ca_pem)?;
    Ok(files)
}

/// Write the API server's certificate and key into the PKI directory `dir` (`api.crt`,
/// `api.key`, 0600, replacing those of an earlier start) and return their paths.
pub fn write_server_files(
    dir: &Path,
    issued: &Issued,
) -> anyhow::Result<(std::path::PathBuf, std::path::PathBuf)> {
    dva_io::local::create_private_dir_all(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let (crt, key) = (dir.join("api.crt"), dir.join("api.key"));
    // Key first, as for the CA: a certificate is never left without its key.
    write_private(&key, &issued.key_pem)?;
    write_private(&crt, &issued.cert_pem)?;
    Ok((crt, key))
}

/// Replace `path` with `text`, mode 0600 whatever the file had before.
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(dva_io::local::FILE_MODE)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use dva_unit::tls::{Credentials, Peer};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use std::os::unix::fs::MetadataExt;

    fn der(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).expect("PEM")
    }

    fn verify(ca_pem: &str, leaf_pem: &str) -> Result<(), webpki::Error> {
        let ca = der(ca_pem);
        let anchor = webpki::anchor_from_trusted_cert(&ca)?.to_owned();
        let leaf = der(leaf_pem);
        let ee = webpki::EndEntityCert::try_from(&leaf)?;
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &[anchor],
            &[],
            UnixTime::now(),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map(|_| ())
    }

    #[test]
    fn issued_certificates_chain_to_their_ca_only() {
        let pki = Pki::generate().unwrap();
        let unit = pki.issue_unit("edge-fw", 7, false).unwrap();
        verify(pki.ca_pem(), &unit.cert_pem).expect("chains to its CA");
        let other = Pki::generate().unwrap();
        // Same name, other key: the signature does not verify.
        assert!(verify(other.ca_pem(), &unit.cert_pem).is_err());
        let foreign = other.issue_unit("edge-fw", 7, false).unwrap();
        assert!(verify(pki.ca_pem(), &foreign.cert_pem).is_err());
    }

    #[test]
    fn certificates_name_their_unit() {
        let pki = Pki::generate().unwrap();
        let unit = pki.issue_unit("edge-fw", 7, false).unwrap();
        assert_eq!(
            Peer::of_cert(&der(&unit.cert_pem)),
            Ok(Peer::Unit {
                appliance: "edge-fw".into(),
                id: 7
            })
        );
        let mgmt = pki.issue_mgmt().unwrap();
        assert_eq!(Peer::of_cert(&der(&mgmt.cert_pem)), Ok(Peer::Mgmt));
        // The manager's certificate carries the server name units check; a unit's does not.
        let manager = pki.issue_unit("edge-fw", 1, true).unwrap();
        let name = ServerName::try_from("manager.edge-fw.dva").unwrap();
        let (m, u) = (der(&manager.cert_pem), der(&unit.cert_pem));
        let ok = |c: &CertificateDer<'_>| {
            webpki::EndEntityCert::try_from(c)
                .unwrap()
                .verify_is_valid_for_subject_name(&name)
                .is_ok()
        };
        assert!(ok(&m));
        assert!(!ok(&u));
        // What a unit loads is what was issued.
        let creds = Credentials::from_pem(&unit.cert_pem, &unit.key_pem, &unit.ca_pem).unwrap();
        assert_eq!(
            creds.identity().unwrap(),
            Peer::Unit {
                appliance: "edge-fw".into(),
                id: 7
            }
        );
    }

    /// The API server's certificate chains to the CA, names what it was asked to (IP addresses
    /// as addresses), serves but cannot be a unit channel client or identity.
    #[test]
    fn server_certificates_name_their_addresses_and_only_serve() {
        let pki = Pki::generate().unwrap();
        let names = [
            "127.0.0.1",
            "localhost",
            "LOCALHOST",
            "::1",
            "dva.example",
            " ",
        ]
        .map(String::from);
        let server = pki.issue_server(&names).unwrap();
        let (ca, leaf) = (der(pki.ca_pem()), der(&server.cert_pem));
        let anchor = webpki::anchor_from_trusted_cert(&ca).unwrap().to_owned();
        let ee = webpki::EndEntityCert::try_from(&leaf).unwrap();
        let usage = |u| {
            ee.verify_for_usage(
                webpki::ALL_VERIFICATION_ALGS,
                std::slice::from_ref(&anchor),
                &[],
                UnixTime::now(),
                u,
                None,
                None,
            )
            .is_ok()
        };
        assert!(usage(webpki::KeyUsage::server_auth()));
        assert!(!usage(webpki::KeyUsage::client_auth()));
        for ok in ["127.0.0.1", "localhost", "::1", "dva.example"] {
            let name = ServerName::try_from(ok).unwrap();
            assert!(ee.verify_is_valid_for_subject_name(&name).is_ok(), "{ok}");
        }
        let other = ServerName::try_from("10.9.9.9").unwrap();
        assert!(ee.verify_is_valid_for_subject_name(&other).is_err());
        assert!(Peer::of_cert(&leaf).is_err(), "no dva identity");
        assert!(pki.issue_server(&[" ".into()]).is_err());

        let dir = std::env::temp_dir().join(format!("dva-pki-srv-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (crt, key) = write_server_files(&dir, &server).unwrap();
        for f in [&crt, &key] {
            assert_eq!(std::fs::metadata(f).unwrap().mode() & 0o777, 0o600);
        }
        assert_eq!(std::fs::read_to_string(&crt).unwrap(), server.cert_pem);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_ca_is_kept_private_and_reused() {
        let dir = std::env::temp_dir().join(format!("dva-pki-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let first = Pki::open(&dir.join("pki")).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o777;
        assert_eq!(mode(&dir.join("pki")), 0o700);
        assert_eq!(mode(&dir.join("pki/ca.key")), 0o600);
        assert_eq!(mode(&dir.join("pki/ca.crt")), 0o600);
        let again = Pki::open(&dir.join("pki")).unwrap();
        assert_eq!(first.ca_pem(), again.ca_pem());
        // Leaves the reloaded CA issues chain to the stored certificate.
        let unit = again.issue_unit("edge-fw", 3, false).unwrap();
        verify(first.ca_pem(), &unit.cert_pem).expect("chains to the stored CA");
        let files = write_unit_files(&dir.join("unit-3"), &unit).unwrap();
        assert_eq!(mode(&dir.join("unit-3")), 0o700);
        for f in [&files.cert, &files.key, &files.ca] {
            assert_eq!(mode(f), 0o600, "{}", f.display());
        }
        let loaded = Credentials::load(&files).unwrap();
        assert_eq!(
            loaded.identity().unwrap(),
            Peer::Unit {
                appliance: "edge-fw".into(),
                id: 3
            }
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
