//! `dva run`: one appliance in the foreground. It runs the management tool's own code path (an
//! embedded [`Mgmt`] with its reconciler and a manager unit), so what `dva run` does is exactly what
//! `dva serve` + `dva apply` do; Ctrl-C/SIGTERM deletes the appliance, stopping every unit.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use dva_lab::Lab;
use dva_mgmt::{ApplianceStatus, ApplianceView, Mgmt, MgmtOptions, ScaleRequest};
use dva_proto::ApplianceSpec;
use serde::{Deserialize, Serialize};

const READY_TIMEOUT: Duration = Duration::from_secs(30);

pub struct RunOptions {
    pub file: PathBuf,
    pub dataplanes: Option<u32>,
    pub place: Place,
}

/// Where the units of `dva run` / `dva serve` go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// The hosts of the lab with this prefix.
    Lab(String),
    /// This machine, in the current network namespace (a real server: the spec names its
    /// devices).
    Local,
}

impl Place {
    /// `--local`, `--prefix P` (or `--lab P`), or neither: the default lab if it exists (the
    /// README's lab commands), else this machine.
    pub fn resolve(prefix: Option<String>, local: bool) -> anyhow::Result<Place> {
        Ok(match (prefix, local) {
            (_, true) => Place::Local,
            (Some(p), false) => Place::Lab(p),
            (None, false) => {
                if Lab::discover(dva_lab::DEFAULT_PREFIX)?.is_some() {
                    Place::Lab(dva_lab::DEFAULT_PREFIX.to_string())
                } else {
                    Place::Local
                }
            }
        })
    }

    /// The prefix of run directories (`/run/dva/<prefix><name>`): none on a real machine.
    pub fn prefix(&self) -> &str {
        match self {
            Place::Lab(p) => p,
            Place::Local => "",
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Place::Lab(p) => format!("lab {p}"),
            Place::Local => "this machine".to_string(),
        }
    }

    pub fn options(&self, state: PathBuf) -> anyhow::Result<MgmtOptions> {
        match self {
            Place::Lab(p) => MgmtOptions::new(state, p),
            Place::Local => MgmtOptions::local(state),
        }
    }

    /// The management tool with `opts`, placing units here (a lab's hosts, or this machine).
    pub fn open(&self, opts: MgmtOptions) -> anyhow::Result<Mgmt> {
        match self {
            Place::Lab(p) => Mgmt::open_in(opts, Box::new(dva_lab::LabHosts::new(p))),
            Place::Local => Mgmt::open(opts),
        }
    }
}

/// What `dva stats` and tests read to find a running appliance's units (`units.json`, written by
/// the reconciler).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UnitRecord {
    pub id: u32,
    pub role: String,
    pub host: String,
    pub pid: Option<u32>,
    pub backplane: Option<SocketAddr>,
    pub control: PathBuf,
    pub log: PathBuf,
}

pub fn run_dir(prefix: &str, name: &str) -> PathBuf {
    PathBuf::from("/run/dva").join(format!("{prefix}{name}"))
}

/// Wait until the appliance is ready (every unit serves the current config), or fail with why not.
pub fn wait_ready(mgmt: &Mgmt, name: &str, timeout: Duration) -> anyhow::Result<ApplianceView> {
    let deadline = Instant::now() + timeout;
    loop {
        let v = mgmt.get(name).map_err(|e| anyhow::anyhow!("{e}"))?;
        if v.status == ApplianceStatus::Ready && v.dataplanes.draining == 0 {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!(
                "appliance {name} not ready after {timeout:?}: status {:?}, error {:?}, units {:?}",
                v.status,
                v.error,
                v.units
                    .iter()
                    .map(|u| format!("{} {} {:?}", u.id, u.role.as_str(), u.state))
                    .collect::<Vec<_>>()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn print_units(v: &ApplianceView) {
    for u in &v.units {
        println!(
            "  unit {:>3}  {:<10}  host {:<16}  pid {:<7}  {:?}",
            u.id,
            u.role.as_str(),
            u.host,
            u.pid.unwrap_or(0),
            u.state
        );
    }
}

pub fn run(opts: &RunOptions) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&opts.file)
        .with_context(|| format!("reading {}", opts.file.display()))?;
    let spec = ApplianceSpec::from_yaml(&text)
        .with_context(|| format!("invalid spec {}", opts.file.display()))?;
    let name = spec.name().to_string();
    if let Place::Lab(prefix) = &opts.place {
        if Lab::discover(prefix)?.is_none() {
            bail!(
                "no lab with prefix {prefix:?}: create it first with `dva lab up --prefix {prefix}` \
                 (or run on this machine with --local)"
            );
        }
    }
    let where_ = opts.place.describe();
    let prefix = opts.place.prefix();
    let dir = run_dir(prefix, &name);
    // A leading manager holds the election lock for as long as it lives.
    if dva_unit::manager::leader_alive(&dir.join(dva_unit::runtime::MANAGER_LOCK)) {
        bail!(
            "appliance {name} already runs on {where_} (see {})",
            dir.display()
        );
    }
    // The embedded management tool keeps its store beside the run directory, for this run only.
    let state = PathBuf::from("/run/dva").join(format!("{prefix}{name}.state"));
    let _ = std::fs::remove_dir_all(&state);
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
    let mgmt = opts.place.open(opts.place.options(state.clone())?)?;
    let result = (|| -> anyhow::Result<()> {
        mgmt.apply(&text).map_err(|e| anyhow::anyhow!("{e}"))?;
        if let Some(n) = opts.dataplanes {
            mgmt.scale(
                &name,
                &ScaleRequest {
                    dataplanes: n,
                    drain_deadline: None,
                },
            )
            .map_err(|e| anyhow::anyhow!("--dataplanes: {e}"))?;
        }
        let v = wait_ready(&mgmt, &name, READY_TIMEOUT)?;
        let in_ = match &opts.place {
            Place::Lab(p) => format!("in lab {p}"),
            Place::Local => "on this machine".to_string(),
        };
        println!(
            "appliance {name} ready {in_} (run dir {}, config version {})",
            dir.display(),
            v.config_version
        );
        print_units(&v);
        println!("stats: dva stats {name} --prefix {prefix:?}   stop: Ctrl-C");
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    })();
    if let Err(e) = &result {
        eprintln!("dva run: {e:#}");
    }
    println!("stopping appliance {name}");
    let _ = mgmt.delete(&name);
    mgmt.shutdown();
    let _ = std::fs::remove_dir_all(&state);
    result
}

fn read_units(dir: &std::path::Path) -> anyhow::Result<Vec<UnitRecord>> {
    let text = std::fs::read_to_string(dir.join("units.json"))?;
    Ok(serde_json::from_str(&text)?)
}

/// `dva stats NAME`: every unit's counters, from its control socket.
/// The run directory of a running appliance: in the lab `prefix`, or, for the default prefix,
/// on this machine (`--local` run directories have no prefix) when the lab has none.
fn find_run_dir(prefix: &str, name: &str) -> PathBuf {
    let dir = run_dir(prefix, name);
    if !dir.exists() && prefix == dva_lab::DEFAULT_PREFIX {
        return run_dir("", name);
    }
    dir
}

/// `dva logs NAME [UNIT] [-f]`: a unit's log (every unit's, each line prefixed with the unit,
/// without UNIT); `follow` keeps printing what is appended, as `tail -f`.
pub fn logs(name: &str, unit: Option<u32>, prefix: &str, follow: bool) -> anyhow::Result<()> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let dir = find_run_dir(prefix, name);
    let units = read_units(&dir).with_context(|| {
        format!(
            "appliance {name} is not running here (no {})",
            dir.join("units.json").display()
        )
    })?;
    let chosen: Vec<&UnitRecord> = match unit {
        Some(id) => {
            let u = units.iter().find(|u| u.id == id).with_context(|| {
                let ids: Vec<u32> = units.iter().map(|u| u.id).collect();
                format!("appliance {name} has no unit {id} (units: {ids:?})")
            })?;
            vec![u]
        }
        None => units.iter().collect(),
    };
    let tag = |u: &UnitRecord| {
        if unit.is_some() {
            String::new()
        } else {
            format!("[{} {}] ", u.role, u.id)
        }
    };
    let mut offsets = vec![0u64; chosen.len()];
    let out = std::io::stdout();
    loop {
        for (i, u) in chosen.iter().enumerate() {
            let Ok(mut f) = std::fs::File::open(&u.log) else {
                continue;
            };
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            if len < offsets[i] {
                // Truncated or replaced: start again.
                offsets[i] = 0;
            }
            if len == offsets[i] {
                continue;
            }
            f.seek(SeekFrom::Start(offsets[i]))?;
            let mut text = String::new();
            // Only whole lines; the rest is printed once its newline is written.
            f.take(len - offsets[i]).read_to_string(&mut text)?;
            let Some(end) = text.rfind('\n') else {
                continue;
            };
            offsets[i] += end as u64 + 1;
            let mut o = out.lock();
            for line in text[..end].lines() {
                writeln!(o, "{}{line}", tag(u))?;
            }
        }
        if !follow {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn stats(name: &str, prefix: &str, json: bool) -> anyhow::Result<()> {
    let dir = find_run_dir(prefix, name);
    let units = read_units(&dir).with_context(|| {
        format!(
            "appliance {name} is not running in lab {prefix} (no {})",
            dir.display()
        )
    })?;
    let mut all = Vec::new();
    for u in &units {
        match dva_unit::control::fetch_stats(&u.control) {
            Ok(s) => all.push(serde_json::json!({"id": u.id, "role": u.role, "host": u.host, "pid": u.pid, "state": "ready", "stats": s})),
            Err(e) => all.push(serde_json::json!({"id": u.id, "role": u.role, "host": u.host, "pid": u.pid, "state": "unreachable", "error": e.to_string()})),
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(());
    }
    println!(
        "{:>4}  {:<10}  {:<14}  {:>7}  {:>12}  {:>12}  {:>7}  {:>8}",
        "UNIT", "ROLE", "HOST", "PID", "RX PKTS", "TX PKTS", "FLOWS", "DROPS"
    );
    for u in &units {
        match dva_unit::control::fetch_stats(&u.control) {
            Ok(s) => println!(
                "{:>4}  {:<10}  {:<14}  {:>7}  {:>12}  {:>12}  {:>7}  {:>8}",
                u.id,
                u.role,
                u.host,
                u.pid.unwrap_or(0),
                s.rx_packets,
                s.tx_packets,
                s.flows,
                s.total_drops()
            ),
            Err(e) => println!(
                "{:>4}  {:<10}  {:<14}  {:>7}  unreachable: {e}",
                u.id,
                u.role,
                u.host,
                u.pid.unwrap_or(0)
            ),
        }
    }
    Ok(())
}
