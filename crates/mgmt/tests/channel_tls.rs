//! The manager channel over TCP with mutual TLS, against a real manager: only a peer holding a
//! certificate of the installation's CA gets anywhere, and a unit speaks only for the unit its
//! certificate names. The CA is the management tool's ([`dva_mgmt::pki`]); the manager runs in
//! this process on loopback.

use std::io::BufReader;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dva_mgmt::pki::{self, Issued, Pki};
use dva_proto::channel::{self, Desired, DesiredRole, DesiredUnit, FromManager, ToManager};
use dva_proto::{ApplianceSpec, RoleConfig};
use dva_unit::manager::{self, ManagerArgs};
use dva_unit::stats::StatsCell;
use dva_unit::tls::{self, Credentials, TlsReader, TlsWriter};
use dva_unit::UnitStats;

const APP: &str = "edge-fw";
const MANAGER: u32 = 1;

struct Manager {
    addr: SocketAddr,
    stats: StatsCell,
    stop: Arc<AtomicBool>,
    dir: PathBuf,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl Drop for Manager {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Manager {
    fn start(pki: &Pki) -> Manager {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "dva-channel-tls-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let issued = pki.issue_unit(APP, MANAGER, true).expect("manager cert");
        let files = pki::write_unit_files(&dir.join("unit-1"), &issued).expect("write cert");
        // A free port on loopback, released just before the manager binds it.
        let addr = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port");
        let stats = StatsCell::new(UnitStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let ready = Arc::new(AtomicBool::new(false));
        let args = ManagerArgs {
            unit: MANAGER,
            listen: addr,
            lock: dir.join("manager.lock"),
            tls: files,
            stop: stop.clone(),
            stats: stats.clone(),
            ready: ready.clone(),
        };
        let thread = std::thread::spawn(move || manager::run(args));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ready.load(Ordering::Acquire) {
            assert!(Instant::now() < deadline, "the manager did not get ready");
            std::thread::sleep(Duration::from_millis(20));
        }
        Manager {
            addr,
            stats,
            stop,
            dir,
            thread: Some(thread),
        }
    }

    fn refused(&self) -> u64 {
        self.stats
            .snapshot()
            .counters
            .get("channel_peer_refused")
            .copied()
            .unwrap_or(0)
    }

    /// Wait until the refusal counter passes `above` (it is published every 200 ms).
    fn refused_above(&self, above: u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let n = self.refused();
            if n > above || Instant::now() > deadline {
                return n;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn connect(&self, creds: &Credentials) -> std::io::Result<(TlsReader, TlsWriter)> {
        tls::connect(
            self.addr,
            creds.client_config()?,
            &tls::manager_server_name(APP),
            Duration::from_secs(5),
        )
    }
}

fn creds(i: &Issued) -> Credentials {
    Credentials::from_pem(&i.cert_pem, &i.key_pem, &i.ca_pem).expect("credentials")
}

fn hello(unit: u32) -> ToManager {
    ToManager::Hello {
        unit,
        role: "dataplane".into(),
        pid: std::process::id(),
        running: None,
    }
}

/// The next message, with a deadline so a manager that says nothing fails the test.
fn next(r: &mut BufReader<TlsReader>) -> std::io::Result<Option<FromManager>> {
    r.get_ref()
        .set_read_timeout(Some(Duration::from_secs(10)))?;
    channel::recv(r)
}

/// A refused peer sees its stream end (or break) without one message from the manager.
fn assert_cut_off(r: &mut BufReader<TlsReader>, what: &str) {
    match next(r) {
        Ok(None) | Err(_) => {}
        Ok(Some(m)) => panic!("{what}: the manager answered {m:?}"),
    }
}

#[test]
fn only_certified_units_get_their_config() {
    let pki = Pki::generate().expect("CA");
    let m = Manager::start(&pki);

    // The management tool hands the manager the desired state: unit 3 is a data plane.
    let spec_text = include_str!("../../../examples/edge-firewall.yaml");
    let spec = ApplianceSpec::from_yaml(spec_text).expect("spec");
    let (_mgmt_r, mut mgmt_w) = m
        .connect(&creds(&pki.issue_mgmt().expect("mgmt cert")))
        .expect("the management tool connects");
    let desired = Desired {
        generation: 1,
        spec,
        units: vec![
            DesiredUnit {
                id: 2,
                role: DesiredRole::Dispatcher,
                addr: "127.0.0.1:6081".parse().expect("addr"),
                draining: false,
                export: false,
                host: None,
            },
            DesiredUnit {
                id: 3,
                role: DesiredRole::Dataplane,
                addr: "127.0.0.1:6082".parse().expect("addr"),
                draining: false,
                export: false,
                host: None,
            },
        ],
    };
    channel::send(&mut mgmt_w, &ToManager::Desired(Box::new(desired))).expect("desired");

    // (a) No client certificate: the handshake is refused.
    let before = m.refused();
    let anonymous = {
        let mut roots = rustls::RootCertStore::empty();
        let ca = creds(&pki.issue_mgmt().expect("cert")).ca;
        roots.add(ca[0].clone()).expect("root");
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        Arc::new(config)
    };
    // In TLS 1.3 the client's side of the handshake may end before the server has checked its
    // certificate: then the refusal shows on the first read.
    if let Ok((r, mut w)) = tls::connect(
        m.addr,
        anonymous,
        &tls::manager_server_name(APP),
        Duration::from_secs(5),
    ) {
        let _ = channel::send(&mut w, &hello(3));
        assert_cut_off(&mut BufReader::new(r), "no certificate");
    }
    let after_a = m.refused_above(before);
    assert!(
        after_a > before,
        "a client without a certificate is counted"
    );

    // (b) A certificate of another CA, even one naming a real unit of this appliance.
    let other = Pki::generate().expect("other CA");
    let foreign = other.issue_unit(APP, 3, false).expect("foreign cert");
    let impostor = Credentials::from_pem(&foreign.cert_pem, &foreign.key_pem, pki.ca_pem())
        .expect("credentials");
    if let Ok((r, mut w)) = m.connect(&impostor) {
        let _ = channel::send(&mut w, &hello(3));
        assert_cut_off(&mut BufReader::new(r), "another CA");
    }
    let after_b = m.refused_above(after_a);
    assert!(after_b > after_a, "a foreign certificate is counted");

    // (c) A genuine certificate for unit 7 claiming to be unit 3.
    let seven = creds(&pki.issue_unit(APP, 7, false).expect("cert"));
    let (r, mut w) = m.connect(&seven).expect("unit 7's handshake succeeds");
    channel::send(&mut w, &hello(3)).expect("hello");
    assert_cut_off(&mut BufReader::new(r), "unit 7 claiming unit 3");
    let after_c = m.refused_above(after_b);
    assert!(after_c > after_b, "a hello for another unit is counted");

    // A unit of another appliance is no peer of this manager either.
    let stranger = creds(&pki.issue_unit("other-app", 3, false).expect("cert"));
    if let Ok((r, mut w)) = m.connect(&stranger) {
        let _ = channel::send(&mut w, &hello(3));
        assert_cut_off(&mut BufReader::new(r), "a unit of another appliance");
    }
    let after_d = m.refused_above(after_c);
    assert!(after_d > after_c, "a unit of another appliance is counted");

    // (d) Unit 3, certified as unit 3, gets its config (once the dispatcher has said hello:
    // a manager makes no first table before it knows whether the dispatchers run one).
    let two = creds(&pki.issue_unit(APP, 2, false).expect("cert"));
    let (_r2, mut w2) = m.connect(&two).expect("unit 2 connects");
    channel::send(&mut w2, &hello(2)).expect("hello");
    let three = creds(&pki.issue_unit(APP, 3, false).expect("cert"));
    let (r, mut w) = m.connect(&three).expect("unit 3 connects");
    channel::send(&mut w, &hello(3)).expect("hello");
    let mut r = BufReader::new(r);
    // Keepalives may come first.
    let first = loop {
        match next(&mut r).expect("the manager answers") {
            Some(FromManager::Alive) => continue,
            other => break other,
        }
    };
    match first {
        Some(FromManager::Config {
            version, config, ..
        }) => {
            assert!(version >= 1);
            match *config {
                RoleConfig::Dataplane(c) => assert_eq!(c.unit, 3),
                other => panic!("unit 3 got a dispatcher config: {other:?}"),
            }
        }
        other => panic!("unit 3 got {other:?} instead of its config"),
    }
    // Certified units may not set the desired state.
    let _ = channel::send(
        &mut w,
        &ToManager::Desired(Box::new(Desired {
            generation: 99,
            spec: ApplianceSpec::from_yaml(spec_text).expect("spec"),
            units: Vec::new(),
        })),
    );
    assert_cut_off(&mut r, "a unit sending desired state");
    assert!(m.refused_above(after_d) > after_d);
}

#[test]
fn a_silent_peer_is_dropped_after_the_handshake_timeout() {
    let pki = Pki::generate().expect("CA");
    let m = Manager::start(&pki);
    let before = m.refused();
    let started = Instant::now();
    let mut s = std::net::TcpStream::connect(m.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut buf = [0u8; 16];
    // The manager closes the connection of a peer that never starts its handshake.
    let n = std::io::Read::read(&mut s, &mut buf).unwrap_or(0);
    assert_eq!(n, 0);
    let waited = started.elapsed();
    assert!(
        waited >= tls::HANDSHAKE_TIMEOUT - Duration::from_millis(500)
            && waited < tls::HANDSHAKE_TIMEOUT + Duration::from_secs(5),
        "closed after {waited:?}"
    );
    assert!(m.refused_above(before) > before);
}

#[test]
fn unauthenticated_connections_are_capped() {
    let pki = Pki::generate().expect("CA");
    let m = Manager::start(&pki);
    // Fill every handshake slot with a peer that never speaks...
    let silent: Vec<std::net::TcpStream> = (0..manager::MAX_HANDSHAKING)
        .map(|_| std::net::TcpStream::connect(m.addr).expect("connect"))
        .collect();
    // ...let the manager accept them all...
    std::thread::sleep(Duration::from_millis(500));
    let before = m.refused();
    // ...and the next one is closed at once, long before any handshake timeout.
    let started = Instant::now();
    let mut extra = std::net::TcpStream::connect(m.addr).expect("connect");
    extra
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut buf = [0u8; 16];
    let n = std::io::Read::read(&mut extra, &mut buf).unwrap_or(0);
    assert_eq!(n, 0);
    assert!(
        started.elapsed() < tls::HANDSHAKE_TIMEOUT / 2,
        "closed after {:?}",
        started.elapsed()
    );
    assert!(m.refused_above(before) > before);
    drop(silent);
    // Once the slots are free again, a certified unit gets through.
    std::thread::sleep(Duration::from_millis(300));
    let three = creds(&pki.issue_unit(APP, 3, false).expect("cert"));
    m.connect(&three)
        .expect("a certified unit connects once slots are free");
}
