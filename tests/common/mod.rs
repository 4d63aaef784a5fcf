//! Shared scaffolding for the end-to-end tests: a lab per test (own prefix), the appliance started
//! with the real `dva` binary, and guards that clean everything up even when a test fails.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use dva_lab::{Lab, LabSpec};
use dva_unit::UnitStats;

pub mod etcd;

/// The machine has 2 cores: lab tests that push traffic run one at a time so their figures and
/// timeouts do not depend on each other.
static LAB_LOCK: Mutex<()> = Mutex::new(());

pub fn serial() -> MutexGuard<'static, ()> {
    LAB_LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn dva_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_dva"))
}

pub fn example(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples")
        .join(name)
}

/// A lab that is removed when dropped (also on panic).
pub struct LabGuard {
    pub lab: Lab,
}

impl LabGuard {
    /// A lab with several dispatcher hosts behind upstream ECMP routers.
    pub fn up_ha(prefix: &str, servers: usize, hosts: usize, dispatchers: usize) -> LabGuard {
        let _ = Lab::down(prefix);
        let lab = Lab::up(&LabSpec {
            prefix: prefix.to_string(),
            servers,
            hosts,
            dispatchers,
            control: false,
        })
        .expect("lab up");
        LabGuard { lab }
    }

    pub fn up(prefix: &str, servers: usize, hosts: usize) -> LabGuard {
        let _ = Lab::down(prefix);
        let lab = Lab::up(&LabSpec {
            prefix: prefix.to_string(),
            servers,
            hosts,
            dispatchers: 1,
            control: false,
        })
        .expect("lab up");
        LabGuard { lab }
    }
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        let _ = Lab::down(&self.lab.prefix);
    }
}

/// A `dva run` process; stopped with SIGTERM when dropped.
pub struct Running {
    pub child: Child,
    pub name: String,
    pub prefix: String,
    pub output: mpsc::Receiver<String>,
}

impl Running {
    pub fn start(prefix: &str, spec: &std::path::Path, name: &str, dataplanes: u32) -> Running {
        let mut child = Command::new(dva_bin())
            .args([
                "run",
                "--prefix",
                prefix,
                "--dataplanes",
                &dataplanes.to_string(),
                "-f",
            ])
            .arg(spec)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn dva run");
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().expect("stdout");
        let err = child.stderr.take().expect("stderr");
        let tx2 = tx.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx2.send(format!("stderr: {l}"));
            }
        });
        let mut r = Running {
            child,
            name: name.to_string(),
            prefix: prefix.to_string(),
            output: rx,
        };
        r.wait_for(" ready in lab", Duration::from_secs(30));
        r
    }

    /// Wait for a line of `dva run`'s output containing `needle`; panics with everything seen otherwise.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            match self.output.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return,
                Ok(l) => seen.push(l),
                Err(_) => break,
            }
        }
        panic!(
            "`dva run` did not print {needle:?} in {timeout:?}; it printed:\n{}",
            seen.join("\n")
        );
    }

    pub fn run_dir(&self) -> PathBuf {
        PathBuf::from("/run/dva").join(format!("{}{}", self.prefix, self.name))
    }

    /// (id, role, stats) of every unit, read over the units' control sockets.
    pub fn unit_stats(&self) -> Vec<(u32, String, UnitStats)> {
        let text = std::fs::read_to_string(self.run_dir().join("units.json")).expect("units.json");
        let units: Vec<serde_json::Value> =
            serde_json::from_str(&text).expect("units.json is JSON");
        units
            .iter()
            .map(|u| {
                let sock = PathBuf::from(u["control"].as_str().expect("control path"));
                let s = dva_unit::control::fetch_stats(&sock).expect("unit stats");
                (
                    u["id"].as_u64().expect("id") as u32,
                    u["role"].as_str().expect("role").to_string(),
                    s,
                )
            })
            .collect()
    }

    pub fn pids(&self) -> Vec<u32> {
        let text = std::fs::read_to_string(self.run_dir().join("units.json")).expect("units.json");
        let units: Vec<serde_json::Value> =
            serde_json::from_str(&text).expect("units.json is JSON");
        units
            .iter()
            .map(|u| u["pid"].as_u64().expect("pid") as u32)
            .collect()
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the child we spawned.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The process exists and is not a zombie (units orphaned by a killed `dva serve` are reaped by
/// whoever adopted them, which may be never in a container).
pub fn pid_alive(pid: u32) -> bool {
    dva_lab::process_alive(pid)
}

/// An embedded management tool (the same code `dva serve` runs) over a lab; deletes its
/// appliances and its store when dropped.
pub struct MgmtGuard {
    pub mgmt: dva_mgmt::Mgmt,
    state: PathBuf,
}

impl MgmtGuard {
    pub fn open(prefix: &str) -> MgmtGuard {
        let state =
            std::env::temp_dir().join(format!("dva-test-state-{prefix}{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&state);
        let mut opts = dva_mgmt::MgmtOptions::new(state.clone(), prefix).expect("options");
        opts.exe = dva_bin();
        MgmtGuard {
            mgmt: dva_mgmt::Mgmt::open_in(opts, Box::new(dva_lab::LabHosts::new(prefix)))
                .expect("open mgmt"),
            state,
        }
    }

    /// A second management tool on the same store (the first must be shut down).
    pub fn reopen(other: &MgmtGuard) -> MgmtGuard {
        let prefix = other.mgmt.options().lab_prefix.clone();
        let mut opts = dva_mgmt::MgmtOptions::new(other.state.clone(), &prefix).expect("options");
        opts.exe = dva_bin();
        MgmtGuard {
            mgmt: dva_mgmt::Mgmt::open_in(opts, Box::new(dva_lab::LabHosts::new(&prefix)))
                .expect("reopen mgmt"),
            state: other.state.clone(),
        }
    }

    pub fn apply_file(&self, path: &std::path::Path) -> dva_mgmt::ApplianceView {
        let text = std::fs::read_to_string(path).expect("spec file");
        self.mgmt.apply(&text).expect("apply")
    }

    pub fn scale(&self, name: &str, n: u32, deadline: Option<&str>) {
        self.mgmt
            .scale(
                name,
                &dva_mgmt::ScaleRequest {
                    dataplanes: n,
                    drain_deadline: deadline.map(str::to_string),
                },
            )
            .expect("scale");
    }

    /// Wait until `f` holds for the appliance's view; panics with the last view otherwise.
    pub fn wait(
        &self,
        name: &str,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut(&dva_mgmt::ApplianceView) -> bool,
    ) -> dva_mgmt::ApplianceView {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let v = self.mgmt.get(name).expect("get");
            if f(&v) {
                return v;
            }
            if std::time::Instant::now() > deadline {
                panic!(
                    "{what}: not within {timeout:?}; last view: {}\nevents: {:#?}",
                    serde_json::to_string_pretty(&v).unwrap_or_default(),
                    self.mgmt.events(name).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// kill -9 the data plane of `view` holding the most flows, then wait until a replacement
    /// brings the appliance back to `dataplanes` ready ones. Returns the victim's id.
    #[allow(dead_code)]
    pub fn kill_busiest_dataplane(
        &self,
        name: &str,
        view: &dva_mgmt::ApplianceView,
        dataplanes: u32,
    ) -> u32 {
        let victim = view
            .units
            .iter()
            .filter(|u| {
                u.role == dva_mgmt::UnitRole::Dataplane && u.state == dva_mgmt::UnitState::Ready
            })
            .max_by_key(|u| u.flows)
            .expect("a data plane");
        eprintln!(
            "killing data plane {} holding {} flows",
            victim.id, victim.flows
        );
        // SAFETY: kill(2) on a unit process this test started.
        unsafe {
            libc::kill(victim.pid.unwrap_or(0) as libc::pid_t, libc::SIGKILL);
        }
        let vid = victim.id;
        self.wait(name, "replaced", Duration::from_secs(15), |v| {
            !v.units.iter().any(|u| u.id == vid) && v.dataplanes.ready == dataplanes
        });
        vid
    }

    /// The control sockets and logs in the appliance's run directory, sorted.
    fn run_files(&self, name: &str) -> Vec<PathBuf> {
        let dir = self
            .mgmt
            .options()
            .run_root
            .join(format!("{}{name}", self.mgmt.options().lab_prefix));
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default();
        files.sort();
        files
    }

    fn is_unit_socket(p: &std::path::Path) -> bool {
        p.file_name()
            .and_then(|f| f.to_str())
            .is_some_and(|f| f.starts_with("unit-") && f.ends_with(".sock"))
    }

    /// Every running unit's stats, read from its control socket.
    #[allow(dead_code)]
    pub fn unit_stats(&self, name: &str) -> Vec<UnitStats> {
        self.run_files(name)
            .iter()
            .filter(|p| Self::is_unit_socket(p))
            .filter_map(|p| dva_unit::control::fetch_stats(p).ok())
            .collect()
    }

    /// Every unit's counters and the end of its log, for a failing test's report: a CI failure
    /// must say what the units saw, not only that a connection broke.
    #[allow(dead_code)]
    pub fn diagnostics(&self, name: &str) -> String {
        let mut out = String::new();
        for p in self.run_files(name) {
            let file = p.file_name().and_then(|f| f.to_str()).unwrap_or("");
            if Self::is_unit_socket(&p) {
                let stats = dva_unit::control::fetch_stats(&p)
                    .map_err(|e| e.to_string())
                    .and_then(|s| serde_json::to_string(&s).map_err(|e| e.to_string()))
                    .unwrap_or_else(|e| e);
                out.push_str(&format!("--- {file}: {stats}\n"));
            } else if file.ends_with(".log") {
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                out.push_str(&format!("--- {file} (last lines):\n"));
                for l in tail.into_iter().rev() {
                    out.push_str(l);
                    out.push('\n');
                }
            }
        }
        out
    }

    /// Ready with exactly `n` data planes serving and none draining.
    pub fn wait_ready(&self, name: &str, n: u32) -> dva_mgmt::ApplianceView {
        self.wait(
            name,
            &format!("{name} ready with {n} data planes"),
            Duration::from_secs(30),
            |v| v.status == dva_mgmt::ApplianceStatus::Ready && v.dataplanes.ready == n,
        )
    }
}

impl Drop for MgmtGuard {
    fn drop(&mut self) {
        for v in self.mgmt.list() {
            let _ = self.mgmt.delete(&v.name);
        }
        self.mgmt.shutdown();
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

/// The spec `text` (YAML) with `runtime` as its runtime section: how a test picks the units'
/// driver or backplane. JSON comes out (a spec may be written in either).
#[allow(dead_code)]
pub fn with_runtime(text: &str, runtime: dva_proto::spec::RuntimeSpec) -> String {
    let mut spec = dva_proto::ApplianceSpec::from_yaml(text).expect("spec parses");
    spec.spec.runtime = runtime;
    serde_json::to_string_pretty(&spec).expect("spec as JSON")
}

/// Example `name` with its units on the UDP backplane (no shared-memory rings), as between
/// machines: where a test looks at or impairs the backplane's datagrams.
#[allow(dead_code)]
pub fn example_over_udp(name: &str) -> String {
    let text = std::fs::read_to_string(example(name)).expect("example spec");
    with_runtime(
        &text,
        dva_proto::spec::RuntimeSpec {
            backplane: dva_proto::spec::BackplaneSpec::Udp,
            ..Default::default()
        },
    )
}

/// Units' stats as `Running::unit_stats` reads them: (id, role, stats).
pub type Stats = [(u32, String, UnitStats)];

/// Drops of `reason`, summed over the units of `role`.
pub fn drops(stats: &Stats, role: &str, reason: &str) -> u64 {
    stats
        .iter()
        .filter(|(_, r, _)| r == role)
        .map(|(_, _, s)| s.drops.get(reason).copied().unwrap_or(0))
        .sum()
}

/// Counter `name`, summed over the units of `role`.
pub fn counter(stats: &Stats, role: &str, name: &str) -> u64 {
    stats
        .iter()
        .filter(|(_, r, _)| r == role)
        .map(|(_, _, s)| s.counters.get(name).copied().unwrap_or(0))
        .sum()
}

/// Poll the units' stats until `f` holds (units publish them every 100 ms); panics with the
/// last stats after 5 s.
pub fn wait_stats(app: &Running, what: &str, mut f: impl FnMut(&Stats) -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let s = app.unit_stats();
        if f(&s) {
            return;
        }
        if std::time::Instant::now() > deadline {
            panic!("{what}: not seen in the units' stats within 5 s; stats: {s:#?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Run `ip ARGS`, failing the test with its error.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The CLI inside namespace `ns` against the API at `server`, not asserting: (succeeded,
/// standard output then standard error).
pub fn try_ctl_in(ns: &str, server: &str, token: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(dva_bin())
        .args(args)
        .args(["--server", server, "--token", token])
        .output()
        .expect("dva");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The CLI inside namespace `ns` against the API at `server`: its standard output; any failure
/// fails the test with what the CLI printed.
pub fn ctl_in(ns: &str, server: &str, token: &str, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(dva_bin())
        .args(args)
        .args(["--server", server, "--token", token])
        .output()
        .expect("dva");
    assert!(
        out.status.success(),
        "dva {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Machines without a lab, made by the test: the appliance's machine (namespace `app`) with
/// `out0` and `in0` (up, no addresses: the appliance owns 198.18.1.1 and 198.18.2.1), a client
/// (198.18.1.2) behind `out0` and a server (198.18.2.2) behind `in0`. Removed on drop.
pub struct Machines([&'static str; 3]);

impl Machines {
    /// Namespaces `[app, client, server]`.
    pub fn up(names: [&'static str; 3]) -> Machines {
        let m = Machines(names);
        m.down();
        let [app, client, server] = names;
        for ns in names {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        for (dev, peer, addr, gw) in [
            ("out0", client, "198.18.1.2/24", "198.18.1.1"),
            ("in0", server, "198.18.2.2/24", "198.18.2.1"),
        ] {
            ip(&[
                "-n", app, "link", "add", dev, "type", "veth", "peer", "name", "eth0", "netns",
                peer,
            ]);
            ip(&["-n", app, "link", "set", dev, "up"]);
            ip(&["-n", peer, "addr", "add", addr, "dev", "eth0"]);
            ip(&["-n", peer, "link", "set", "eth0", "up"]);
            ip(&["-n", peer, "route", "add", "default", "via", gw]);
        }
        m
    }

    fn down(&self) {
        for ns in self.0 {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Drop for Machines {
    fn drop(&mut self) {
        self.down();
    }
}
