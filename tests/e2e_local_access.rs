//! End to end: a local user who is not root (`nobody`) gets nothing out of a running appliance
//! (issue #13, local access). It cannot read a shared-memory ring, get an answer from a unit's
//! control socket or from the manager's TCP port (mutual TLS: no certificate, no answer), nor
//! bind a unit's backplane address and port. And each layer holds on its own: with the run
//! directory and the sockets opened up by hand, the ring files are still 0600 and the control
//! sockets still refuse the connection (SO_PEERCRED).
//!
//! The attempts run in a child process as `nobody` (setpriv, from util-linux): this test binary
//! started again with [`PROBE`] set, which runs one attempt and prints its outcome.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// Set to `<attempt> <argument>` in the child: `read PATH`, `http PATH`, `hello ADDR/UNIT` or
/// `bind ADDR`.
const PROBE: &str = "DVA_LOCAL_ACCESS_PROBE";
/// The child prints its outcome on a line starting with this.
const OUTCOME: &str = "probe outcome: ";

/// The child's side. In a normal test run [`PROBE`] is unset and this does nothing.
#[test]
fn probe() {
    let Ok(what) = std::env::var(PROBE) else {
        return;
    };
    let (attempt, arg) = what.split_once(' ').expect("probe: <attempt> <argument>");
    let outcome = match attempt {
        "read" => match std::fs::read(arg) {
            Ok(bytes) => format!("read {} bytes", bytes.len()),
            Err(e) => format!("refused: {e}"),
        },
        "http" => converse(Path::new(arg), b"GET /stats HTTP/1.0\r\nHost: unit\r\n\r\n"),
        "hello" => {
            // Claim to be one of the appliance's units, in clear: a manager that took it would
            // hand this connection the unit's config stream.
            let (addr, unit) = arg.rsplit_once('/').expect("hello ADDR/UNIT");
            let mut line = Vec::new();
            dva_proto::channel::send(
                &mut line,
                &dva_proto::channel::ToManager::Hello {
                    unit: unit.parse().expect("unit id"),
                    role: "dataplane".into(),
                    pid: std::process::id(),
                    running: None,
                },
            )
            .expect("encode hello");
            match std::net::TcpStream::connect(addr) {
                // A TLS alert record (content type 21) is the manager's refusal, not an answer.
                Ok(s) => match converse_on(s, &line) {
                    o if o.starts_with("answered: \"\\u{15}") => {
                        format!("refused: TLS alert ({o})")
                    }
                    o => o,
                },
                Err(e) => format!("refused: connect: {e}"),
            }
        }
        "bind" => bind_reusing(arg.parse().expect("socket address")),
        other => panic!("unknown probe attempt {other:?}"),
    };
    println!("{OUTCOME}{outcome}");
}

/// Connect, send `request`, and read the first bytes that come back, if any: a peer that
/// answers at all has answered (the manager would go on streaming configs, so this does not
/// wait for it to close).
fn converse(path: &Path, request: &[u8]) -> String {
    match UnixStream::connect(path) {
        Ok(s) => converse_on(s, request),
        Err(e) => format!("refused: connect: {e}"),
    }
}

fn converse_on<S: Read + Write + Timeout>(mut s: S, request: &[u8]) -> String {
    // Only so a server that keeps the connection open without a word cannot hang the test; that
    // case is reported as such, not taken for a refusal.
    s.timeout(Duration::from_secs(10));
    let _ = s.write_all(request);
    let mut got = [0u8; 60];
    match s.read(&mut got) {
        Ok(0) => "refused: closed without an answer".to_string(),
        Ok(n) => format!("answered: {:?}", String::from_utf8_lossy(&got[..n])),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
            "refused: reset without an answer".to_string()
        }
        Err(e) => format!("kept open without an answer: {e}"),
    }
}

trait Timeout {
    fn timeout(&self, t: Duration);
}

impl Timeout for UnixStream {
    fn timeout(&self, t: Duration) {
        self.set_read_timeout(Some(t)).expect("read timeout");
    }
}

impl Timeout for std::net::TcpStream {
    fn timeout(&self, t: Duration) {
        self.set_read_timeout(Some(t)).expect("read timeout");
    }
}

/// What an unprivileged user tries on a backplane port: SO_REUSEADDR, then bind.
fn bind_reusing(addr: SocketAddr) -> String {
    let SocketAddr::V4(v4) = addr else {
        return format!("unsupported address {addr}");
    };
    // SAFETY: socket(2) takes no pointers; the descriptor is closed when the probe exits.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    let on: libc::c_int = 1;
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(v4.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: `on` and `sin` are live locals of the sizes passed; the kernel only reads them.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        libc::bind(
            fd,
            (&sin as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if r == 0 {
        "bound".to_string()
    } else {
        format!("refused: {}", std::io::Error::last_os_error())
    }
}

/// Run one attempt as `nobody`, in network namespace `netns` if given; its outcome line.
fn as_nobody(netns: Option<&str>, attempt: &str) -> String {
    let exe = std::env::current_exe().expect("test binary");
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "setpriv"]);
            c
        }
        None => Command::new("setpriv"),
    };
    let out = cmd
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
        .arg(exe)
        .args(["--exact", "probe", "--nocapture", "--test-threads=1"])
        .env(PROBE, attempt)
        .output()
        .expect("running setpriv");
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .find_map(|l| l.find(OUTCOME).map(|i| l[i + OUTCOME.len()..].to_string()))
        .unwrap_or_else(|| {
            panic!(
                "probe {attempt:?} printed no outcome; stdout:\n{stdout}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

fn assert_refused(netns: Option<&str>, attempt: &str) {
    let outcome = as_nobody(netns, attempt);
    eprintln!("as nobody: {attempt} -> {outcome}");
    assert!(
        outcome.starts_with("refused"),
        "as nobody, {attempt:?} got: {outcome}"
    );
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

/// A directory's mode changed for a while; the old one is restored on drop (also on panic).
struct Loosened {
    path: PathBuf,
    old: u32,
}

impl Loosened {
    fn new(path: &Path, mode: u32) -> Loosened {
        let old = std::fs::metadata(path)
            .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
            .permissions()
            .mode()
            & 0o7777;
        chmod(path, mode);
        Loosened {
            path: path.to_path_buf(),
            old,
        }
    }
}

impl Drop for Loosened {
    fn drop(&mut self) {
        let _ = std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(self.old));
    }
}

struct Unit {
    id: u32,
    role: String,
    host: String,
    backplane: Option<SocketAddr>,
    channel: Option<SocketAddr>,
    control: PathBuf,
}

fn units(app: &Running) -> Vec<Unit> {
    let text = std::fs::read_to_string(app.run_dir().join("units.json")).expect("units.json");
    let units: Vec<serde_json::Value> = serde_json::from_str(&text).expect("units.json is JSON");
    units
        .iter()
        .map(|u| Unit {
            id: u["id"].as_u64().expect("id") as u32,
            role: u["role"].as_str().expect("role").to_string(),
            host: u["host"].as_str().expect("host").to_string(),
            backplane: u["backplane"].as_str().and_then(|a| a.parse().ok()),
            channel: u["channel"].as_str().and_then(|a| a.parse().ok()),
            control: PathBuf::from(u["control"].as_str().expect("control path")),
        })
        .collect()
}

/// The counter `name` of the unit behind `control`, once it is at least 1 (the manager publishes
/// its counters every 200 ms); panics with the counters seen otherwise.
fn wait_counter(control: &Path, name: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let stats = dva_unit::control::fetch_stats(control).expect("unit stats");
        if let Some(n) = stats.counters.get(name).copied().filter(|n| *n > 0) {
            return n;
        }
        if Instant::now() > deadline {
            panic!("no {name} in {}: {:?}", control.display(), stats.counters);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn nobody_gets_nothing_out_of_a_running_appliance() {
    let _serial = serial();
    let _lab = LabGuard::up("e2ela-", 1, 1);
    let app = Running::start("e2ela-", &example("edge-firewall.yaml"), "edge-fw", 1);
    let run_dir = app.run_dir();
    let units = units(&app);
    let dataplane = units
        .iter()
        .find(|u| u.role == "dataplane")
        .expect("a data plane");
    let manager = units
        .iter()
        .find(|u| u.role == "manager")
        .expect("a manager");
    let backplane = dataplane
        .backplane
        .expect("the data plane's backplane address");
    let channel = manager.channel.expect("the manager's channel address");
    let ring = std::fs::read_dir(&run_dir)
        .expect("run dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "ring"))
        .expect("a shared-memory ring in the run directory");

    // The appliance as deployed.
    assert_eq!(
        std::fs::metadata(&run_dir)
            .expect("run dir")
            .permissions()
            .mode()
            & 0o777,
        0o700
    );
    assert_refused(None, &format!("read {}", ring.display()));
    assert_refused(None, &format!("http {}", dataplane.control.display()));
    // In the manager's namespace, where its port is.
    assert_refused(
        Some(&manager.host),
        &format!("hello {channel}/{}", dataplane.id),
    );
    // In the data plane's own namespace, where its address is.
    assert_refused(Some(&dataplane.host), &format!("bind {backplane}"));

    // Each layer on its own: open the directories and the sockets up by hand (as a careless
    // umask or an operator might); the ring's own mode and the sockets' peer check still hold.
    {
        let _root = Loosened::new(run_dir.parent().expect("/run/dva"), 0o711);
        let _dir = Loosened::new(&run_dir, 0o755);
        chmod(&dataplane.control, 0o666);
        assert_refused(None, &format!("read {}", ring.display()));
        assert_refused(None, &format!("http {}", dataplane.control.display()));
    }
    // The refusals are counted where the operator looks.
    assert!(wait_counter(&dataplane.control, "control_peer_refused") >= 1);
    assert!(wait_counter(&manager.control, "channel_peer_refused") >= 1);
    // Root, as always, is served.
    let stats = dva_unit::control::fetch_stats(&dataplane.control).expect("root reads stats");
    assert_eq!(stats.unit, dataplane.id);
}
