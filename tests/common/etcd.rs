//! A real etcd cluster (`/usr/bin/etcd`, three members speaking only TLS) and `dva serve`
//! replicas on it, for the end-to-end tests that need several replicas (e2e_etcd, e2e_agents).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::dva_bin;

/// Client ports of the three members (their peer ports are these + 10).
pub const MEMBERS: [u16; 3] = [23791, 23792, 23793];

/// Three etcd members on the appliance machine's loopback, each with its own data dir; killed
/// and removed on drop.
pub struct Etcd {
    members: Vec<Option<Child>>,
    dir: PathBuf,
}

/// The cluster's own CA (not dva's: etcd's certificates are the operator's), a certificate for
/// the members (client and peer links, naming 127.0.0.1) and one for dva serve. Files under
/// `dir`; returns nothing, the paths are [`pki_file`]'s.
pub fn make_etcd_pki(dir: &std::path::Path) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose, SanType,
    };
    std::fs::create_dir_all(dir).expect("pki dir");
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.distinguished_name
        .push(DnType::CommonName, "e2e etcd CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = ca.self_signed(&ca_key).expect("CA");
    let leaf = |name: &str, ip: bool, usages: Vec<ExtendedKeyUsagePurpose>| {
        let key = KeyPair::generate().expect("key");
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        p.distinguished_name.push(DnType::CommonName, name);
        if ip {
            p.subject_alt_names
                .push(SanType::IpAddress("127.0.0.1".parse().expect("ip")));
        }
        p.extended_key_usages = usages;
        let cert = p.signed_by(&key, &ca, &ca_key).expect("sign");
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).expect("write cert");
        std::fs::write(dir.join(format!("{name}-key.pem")), key.serialize_pem()).expect("key");
    };
    use ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
    // Members authenticate each other with the same certificate, as clients and servers.
    leaf("member", true, vec![ServerAuth, ClientAuth]);
    leaf("dva", false, vec![ClientAuth]);
    std::fs::write(dir.join("ca.pem"), ca.pem()).expect("write CA");
}

/// A file of the cluster's PKI (see [`make_etcd_pki`]).
pub fn pki_file(name: &str) -> String {
    Etcd::dir()
        .join("pki")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

/// The flags that make `dva serve` talk TLS to the cluster with its client certificate.
pub fn etcd_tls_args() -> Vec<String> {
    vec![
        "--etcd-cafile".into(),
        pki_file("ca.pem"),
        "--etcd-certfile".into(),
        pki_file("dva.pem"),
        "--etcd-keyfile".into(),
        pki_file("dva-key.pem"),
    ]
}

impl Etcd {
    pub fn dir() -> PathBuf {
        std::env::temp_dir().join(format!("dva-etcd-{}", std::process::id()))
    }

    /// Three members that speak only TLS, to clients and to each other, and accept only clients
    /// with a certificate of the cluster's CA (`--client-cert-auth`).
    pub fn start(ns: &str) -> Etcd {
        let dir = Etcd::dir();
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("etcd dir");
        make_etcd_pki(&dir.join("pki"));
        let cluster: Vec<String> = MEMBERS
            .iter()
            .enumerate()
            .map(|(i, p)| format!("m{}=https://127.0.0.1:{}", i + 1, p + 10))
            .collect();
        let cluster = cluster.join(",");
        let members = MEMBERS
            .iter()
            .enumerate()
            .map(|(i, port)| {
                let name = format!("m{}", i + 1);
                let client = format!("https://127.0.0.1:{port}");
                let peer = format!("https://127.0.0.1:{}", port + 10);
                let log = std::fs::File::create(dir.join(format!("{name}.log"))).expect("log");
                let child = Command::new("ip")
                    .args(["netns", "exec", ns, "etcd", "--name", &name, "--data-dir"])
                    .arg(dir.join(&name))
                    .args(["--listen-client-urls", &client])
                    .args(["--advertise-client-urls", &client])
                    .args(["--listen-peer-urls", &peer])
                    .args(["--initial-advertise-peer-urls", &peer])
                    .args(["--initial-cluster", &cluster])
                    .args(["--initial-cluster-state", "new"])
                    .args(["--initial-cluster-token", "dva-e2e"])
                    .args(["--client-cert-auth", "--peer-client-cert-auth"])
                    .args(["--trusted-ca-file", &pki_file("ca.pem")])
                    .args(["--cert-file", &pki_file("member.pem")])
                    .args(["--key-file", &pki_file("member-key.pem")])
                    .args(["--peer-trusted-ca-file", &pki_file("ca.pem")])
                    .args(["--peer-cert-file", &pki_file("member.pem")])
                    .args(["--peer-key-file", &pki_file("member-key.pem")])
                    .stdout(Stdio::null())
                    .stderr(log)
                    .spawn()
                    .expect("etcd (install-deps installs etcd-server)");
                Some(child)
            })
            .collect();
        let etcd = Etcd { members, dir };
        // Three members electing a leader over TLS: seconds normally, longer on a loaded
        // machine.
        let deadline = Instant::now() + Duration::from_secs(60);
        for port in MEMBERS {
            let url = format!("https://127.0.0.1:{port}/health");
            loop {
                let out = Command::new("ip")
                    .args(["netns", "exec", ns, "curl", "-sS", "--max-time", "2"])
                    .args(["--cacert", &pki_file("ca.pem")])
                    .args(["--cert", &pki_file("dva.pem")])
                    .args(["--key", &pki_file("dva-key.pem"), &url])
                    .output()
                    .map(|o| {
                        String::from_utf8_lossy(&o.stdout).into_owned()
                            + &String::from_utf8_lossy(&o.stderr)
                    });
                match out {
                    Ok(body) if body.contains("\"health\":\"true\"") => break,
                    _ if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(200))
                    }
                    other => {
                        // What the members said, for whoever reads the failure.
                        let logs: String = (1..=MEMBERS.len())
                            .map(|i| {
                                let log =
                                    std::fs::read_to_string(etcd.dir.join(format!("m{i}.log")))
                                        .unwrap_or_default();
                                // From its first complaint on: a Go panic's message comes
                                // before its stack (e.g. "create wal error: no space left").
                                let lines: Vec<&str> = log.lines().collect();
                                let first = lines
                                    .iter()
                                    .position(|l| l.contains(" C | ") || l.contains(" E | "))
                                    .unwrap_or(lines.len().saturating_sub(15));
                                let end = lines.len().min(first + 15);
                                format!("--- m{i}.log:\n{}\n", lines[first..end].join("\n"))
                            })
                            .collect();
                        panic!("etcd member at {port} never healthy: {other:?}\n{logs}")
                    }
                }
            }
        }
        etcd
    }

    pub fn endpoints() -> String {
        let e: Vec<String> = MEMBERS.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        e.join(",")
    }

    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A `dva serve` replica in the appliance's namespace; output lines on a channel; SIGTERM then
/// SIGKILL on drop (unless already killed).
pub struct Replica {
    child: Option<Child>,
    pub lines: std::sync::mpsc::Receiver<String>,
    pub state: PathBuf,
    pub url: String,
}

impl Replica {
    pub fn start(ns: &str, n: u16, ip: &str, extra: &[&str]) -> Replica {
        let state = std::env::temp_dir().join(format!("dva-etcd-r{n}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&state);
        let listen = format!("{ip}:{}", 17180 + n);
        let store = format!("etcd://{}", Etcd::endpoints());
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(dva_bin())
            .args(["serve", "--local", "--no-client-config", "--state"])
            .arg(&state)
            .args(["--store", &store, "--listen", &listen])
            .args(etcd_tls_args())
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn dva serve");
        let (tx, lines) = std::sync::mpsc::channel();
        let out = child.stdout.take().expect("stdout");
        let err = child.stderr.take().expect("stderr");
        let tx2 = tx.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                // Echoed too: the test harness shows it when the test fails.
                eprintln!("[replica {n}] {l}");
                let _ = tx.send(l);
            }
        });
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                eprintln!("[replica {n}] {l}");
                let _ = tx2.send(l);
            }
        });
        Replica {
            child: Some(child),
            lines,
            state,
            url: format!("http://{listen}"),
        }
    }

    pub fn wait_for(&mut self, needle: &str) {
        // Three members electing a leader over TLS: seconds normally, longer on a loaded
        // machine.
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return,
                Ok(l) => seen.push(l),
                Err(_) => break,
            }
        }
        panic!(
            "dva serve did not print {needle:?}; it printed:\n{}",
            seen.join("\n")
        );
    }

    pub fn token(&self) -> String {
        let t = std::fs::read_to_string(self.state.join("token")).expect("token");
        t.trim().to_string()
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            // `ip netns exec` execs dva in place: this is dva serve itself.
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on the child we spawned.
            unsafe {
                libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.state);
    }
}
