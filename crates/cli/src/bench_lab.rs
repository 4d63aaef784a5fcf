//! What the lab benchmarks that compare dva with the kernel share: `dva run` as a child, the
//! kernel's equivalent of the edge firewall, unit statistics and CPU accounting.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use dva_proto::spec::RuntimeSpec;
use dva_proto::ApplianceSpec;

/// How long `dva run` may take to report its appliance ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The edge firewall of examples/edge-firewall.yaml in nftables terms. Interface 0 of the spec
/// (outside) is out0, interface 1 (inside) is in0. dva opens TCP connections on a SYN only
/// and drops what does not fit a connection, hence the flags test and `ct state invalid drop`.
pub(crate) const NFT_EDGE_FIREWALL: &str = r#"    chain forward {
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        ct state invalid drop
        iifname "out0" ip daddr 198.18.2.0/24 tcp dport { 80, 5201 } tcp flags & (syn | ack) == syn accept
        iifname "out0" ip daddr 198.18.2.0/24 icmp type echo-request accept
        iifname "in0" accept
    }"#;

/// `dva run` as a child process, stopped with SIGTERM on drop (as in `dva bench forwarding`).
pub(crate) struct Appliance {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    /// The spec file written for this run (removed with it).
    written: Option<PathBuf>,
}

impl Appliance {
    /// `dva run` of `spec` with `runtime` as its runtime section (driver, backplane, ...): the
    /// spec with it goes to a file of its own beside the temporary files.
    pub(crate) fn start_with(
        spec: &Path,
        prefix: &str,
        dataplanes: u32,
        runtime: &RuntimeSpec,
    ) -> anyhow::Result<Appliance> {
        if runtime.is_default() {
            return Appliance::spawn(spec, prefix, dataplanes, false);
        }
        let text =
            std::fs::read_to_string(spec).with_context(|| format!("reading {}", spec.display()))?;
        let mut s = ApplianceSpec::from_yaml(&text)
            .with_context(|| format!("invalid spec {}", spec.display()))?;
        s.spec.runtime = runtime.clone();
        let path =
            std::env::temp_dir().join(format!("{prefix}{}-{}.json", s.name(), std::process::id()));
        std::fs::write(&path, serde_json::to_string_pretty(&s)?)
            .with_context(|| format!("writing {}", path.display()))?;
        let started = Appliance::spawn(&path, prefix, dataplanes, false);
        match started {
            Ok(mut app) => {
                app.written = Some(path);
                Ok(app)
            }
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                Err(e)
            }
        }
    }

    /// `dva run`, its output printed as it comes (indented, after `  | `), as `dva demo` shows it.
    pub(crate) fn start_echoed(
        spec: &Path,
        prefix: &str,
        dataplanes: u32,
    ) -> anyhow::Result<Appliance> {
        Appliance::spawn(spec, prefix, dataplanes, true)
    }

    fn spawn(spec: &Path, prefix: &str, dataplanes: u32, echo: bool) -> anyhow::Result<Appliance> {
        let exe = std::env::current_exe()?;
        let mut child = Command::new(exe)
            .args(["run", "--prefix", prefix, "--dataplanes"])
            .arg(dataplanes.to_string())
            .arg("-f")
            .arg(spec)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting `dva run`")?;
        let out = child.stdout.take().context("dva run stdout")?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let lines = log.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if echo {
                    println!("  | {l}");
                }
                if let Ok(mut v) = lines.lock() {
                    v.push(l.clone());
                }
                let _ = tx.send(l);
            }
        });
        let mut app = Appliance {
            child,
            log,
            written: None,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(l) if l.contains(" ready in lab") => return Ok(app),
                Ok(_) => {}
                Err(_) => {
                    let _ = app.child.kill();
                    bail!(
                        "dva run --dataplanes {dataplanes} was not ready within {READY_TIMEOUT:?}; its output:\n{}",
                        app.output()
                    );
                }
            }
        }
    }

    pub(crate) fn output(&self) -> String {
        self.log.lock().map(|v| v.join("\n")).unwrap_or_default()
    }
}

impl Drop for Appliance {
    fn drop(&mut self) {
        if let Some(path) = self.written.take() {
            let _ = std::fs::remove_file(path);
        }
        // SAFETY: kill(2) on our own child process, which has not been reaped yet.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every unit's statistics (role, counters), from its control socket.
pub(crate) fn unit_stats(
    prefix: &str,
    appliance: &str,
) -> anyhow::Result<Vec<(String, dva_unit::UnitStats)>> {
    let path = crate::run::run_dir(prefix, appliance).join("units.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let units: Vec<serde_json::Value> = serde_json::from_str(&text)?;
    let mut out = Vec::new();
    for u in &units {
        let role = u.get("role").and_then(serde_json::Value::as_str);
        let control = u.get("control").and_then(serde_json::Value::as_str);
        let (Some(role), Some(control)) = (role, control) else {
            bail!("{}: a unit without role or control socket", path.display());
        };
        let stats = dva_unit::control::fetch_stats(Path::new(control))
            .with_context(|| format!("stats of a {role} unit ({control})"))?;
        out.push((role.to_string(), stats));
    }
    Ok(out)
}

/// Process ids of the running appliance's units (from the run directory's units.json). The
/// reconciler writes the file as units start and again once their pids are known: this waits
/// up to 5 s for every unit listed to have one (a bench path once read the file in between and
/// measured no CPU at all).
pub(crate) fn unit_pids(prefix: &str, appliance: &str) -> anyhow::Result<Vec<u32>> {
    let path = crate::run::run_dir(prefix, appliance).join("units.json");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let units: Vec<serde_json::Value> = serde_json::from_str(&text)?;
        let pids: Vec<u32> = units
            .iter()
            .filter_map(|u| u.get("pid").and_then(serde_json::Value::as_u64))
            .filter_map(|p| u32::try_from(p).ok())
            .collect();
        let all = !pids.is_empty() && pids.len() == units.len();
        if all || std::time::Instant::now() > deadline {
            if pids.is_empty() {
                bail!("{}: no unit pids", path.display());
            }
            return Ok(pids);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Busy and softirq time of all CPUs, seconds (the aggregate `cpu` line of /proc/stat).
pub(crate) fn machine_cpu() -> anyhow::Result<(f64, f64)> {
    let text = std::fs::read_to_string("/proc/stat")?;
    let line = text
        .lines()
        .find(|l| l.starts_with("cpu "))
        .ok_or_else(|| anyhow!("/proc/stat has no cpu line"))?;
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0.0))
        .collect();
    // user nice system idle iowait irq softirq steal guest guest_nice; guest time is already
    // counted in user and nice.
    let get = |i: usize| v.get(i).copied().unwrap_or(0.0);
    let busy = get(0) + get(1) + get(2) + get(5) + get(6) + get(7);
    let hz = clock_ticks();
    Ok((busy / hz, get(6) / hz))
}

/// user + sys seconds of processes (threads included); a process that is gone counts 0.
pub(crate) fn process_cpu(pids: &[u32]) -> f64 {
    let hz = clock_ticks();
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|s| {
            // The command name may contain spaces and parentheses: fields follow the last ')'.
            let rest = &s[s.rfind(')')? + 1..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            let utime: f64 = f.get(11)?.parse().ok()?;
            let stime: f64 = f.get(12)?.parse().ok()?;
            Some((utime + stime) / hz)
        })
        .sum()
}

/// Seconds the threads of processes `pids` spent runnable but waiting for a CPU (the second
/// field of /proc/PID/task/TID/schedstat, in ns): how much a busy machine held them back. A
/// process that is gone counts 0.
pub(crate) fn runqueue_wait(pids: &[u32]) -> f64 {
    let mut ns = 0u64;
    for pid in pids {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let Ok(text) = std::fs::read_to_string(task.path().join("schedstat")) else {
                continue;
            };
            ns += text
                .split_whitespace()
                .nth(1)
                .and_then(|w| w.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    ns as f64 / 1e9
}

/// A value under /proc/sys/net/netfilter (`nf_conntrack_count`, `nf_conntrack_max`) as the
/// kernel of namespace `ns` sees it (each namespace has its own connection table).
pub(crate) fn netfilter_sysctl(ns: &str, name: &str) -> Option<u64> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "cat"])
        .arg(format!("/proc/sys/net/netfilter/{name}"))
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// Connections in the kernel's table of namespace `ns`.
pub(crate) fn conntrack_count(ns: &str) -> Option<u64> {
    netfilter_sysctl(ns, "nf_conntrack_count")
}

/// Whose CPU time is the path's own.
#[derive(Clone)]
pub(crate) enum PathCpu {
    /// Softirq time of all CPUs: where the kernel forwards, filters and NATs.
    Softirq,
    /// user + sys of these processes.
    Processes(Vec<u32>),
}

impl PathCpu {
    pub(crate) fn read(&self, softirq: f64) -> f64 {
        match self {
            PathCpu::Softirq => softirq,
            PathCpu::Processes(pids) => process_cpu(pids),
        }
    }
}

/// A table of `header` and `lines` as aligned text or as Markdown; `right(i)` says whether
/// column `i` holds figures (right-aligned).
pub(crate) fn render_table(
    header: &[&str],
    lines: &[Vec<String>],
    right: impl Fn(usize) -> bool,
    markdown: bool,
) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if markdown {
        let _ = writeln!(out, "| {} |", header.join(" | "));
        let rule: String = (0..header.len())
            .map(|i| if right(i) { "---:|" } else { "---|" })
            .collect();
        let _ = writeln!(out, "|{rule}");
        for l in lines {
            let _ = writeln!(out, "| {} |", l.join(" | "));
        }
        return out;
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|c| {
            lines
                .iter()
                .filter_map(|l| l.get(c).map(String::len))
                .chain(std::iter::once(header[c].len()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let fmt_line = |cells: &[&str]| -> String {
        cells
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (c, w))| {
                if right(i) {
                    format!("{c:>w$}")
                } else {
                    format!("{c:<w$}")
                }
            })
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let _ = writeln!(out, "{}", fmt_line(header));
    for l in lines {
        let cells: Vec<&str> = l.iter().map(String::as_str).collect();
        let _ = writeln!(out, "{}", fmt_line(&cells));
    }
    out
}
