//! `dva run`: one appliance in the foreground, its units started as processes on the lab's hosts.
//!
//! This is the manager-less way to run: the spec is compiled here once and each unit reads its
//! role config from a file. The management tool replaces this with a reconciler and a config
//! stream; the unit processes are the same.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use dva_flow::{BucketTable, UnitId};
use dva_lab::Lab;
use dva_proto::{compile, ApplianceSpec, Placement, RoleConfig, UnitEndpoint};
use serde::{Deserialize, Serialize};

/// GENEVE's IANA port; further units on one host take the next ports.
const BACKPLANE_PORT: u16 = 6081;
const DISPATCHER_ID: UnitId = 1;
const FIRST_DATAPLANE_ID: UnitId = 11;
const READY_TIMEOUT: Duration = Duration::from_secs(15);

pub struct RunOptions {
    pub file: PathBuf,
    pub dataplanes: Option<u32>,
    pub prefix: String,
}

/// What `dva stats` and tests read to find a running appliance's units.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UnitRecord {
    pub id: UnitId,
    pub role: String,
    pub host: String,
    pub pid: u32,
    pub backplane: SocketAddr,
    pub control: PathBuf,
    pub log: PathBuf,
}

pub fn run_dir(prefix: &str, name: &str) -> PathBuf {
    PathBuf::from("/run/dva").join(format!("{prefix}{name}"))
}

struct Unit {
    record: UnitRecord,
    child: Child,
}

pub fn run(opts: &RunOptions) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&opts.file)
        .with_context(|| format!("reading {}", opts.file.display()))?;
    let spec = ApplianceSpec::from_yaml(&text)
        .with_context(|| format!("invalid spec {}", opts.file.display()))?;
    let lab = Lab::discover(&opts.prefix)?.with_context(|| {
        format!(
            "no lab with prefix {:?}: create it first with `dva lab up --prefix {}`",
            opts.prefix, opts.prefix
        )
    })?;
    let layout = &spec.spec.layout.dataplanes;
    let n = opts.dataplanes.unwrap_or(layout.initial());
    if n < 1 || n > layout.max {
        bail!(
            "--dataplanes {n} is outside the spec's layout (1..={})",
            layout.max
        );
    }
    if lab.hosts == 0 {
        bail!("lab {} has no data-plane hosts", opts.prefix);
    }
    let dir = run_dir(&opts.prefix, spec.name());
    if dir.join("units.json").exists() {
        if let Ok(units) = read_units(&dir) {
            if units.iter().any(|u| pid_alive(u.pid)) {
                bail!(
                    "appliance {} already runs in lab {} (see {})",
                    spec.name(),
                    opts.prefix,
                    dir.display()
                );
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;

    // Placement: the dispatcher on the dispatcher host, data planes spread round-robin over the hosts.
    let disp_addr = SocketAddr::new(
        IpAddr::V4(Lab::dispatcher_backplane_addr(1)),
        BACKPLANE_PORT,
    );
    let dispatchers = vec![UnitEndpoint {
        id: DISPATCHER_ID,
        addr: disp_addr,
    }];
    let mut dataplanes = Vec::new();
    let mut dp_hosts = Vec::new();
    for k in 0..n as usize {
        let host = k % lab.hosts + 1;
        let port = BACKPLANE_PORT + (k / lab.hosts) as u16;
        let addr = SocketAddr::new(IpAddr::V4(Lab::host_backplane_addr(host)), port);
        dataplanes.push(UnitEndpoint {
            id: FIRST_DATAPLANE_ID + k as UnitId,
            addr,
        });
        dp_hosts.push(lab.host_ns(host));
    }
    let ids: Vec<UnitId> = dataplanes.iter().map(|d| d.id).collect();
    let table = BucketTable::maglev(spec.spec.layout.buckets, &ids)?;
    let placement = Placement {
        dispatchers,
        dataplanes,
        table,
    };
    let (dcfgs, pcfgs) = compile(&spec, &placement, 1)?;

    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;

    let mut units: Vec<Unit> = Vec::new();
    let started = (|| -> anyhow::Result<()> {
        // Data planes first: the dispatcher sends to them as soon as it is up.
        for (cfg, host) in pcfgs.into_iter().zip(dp_hosts) {
            let ep = cfg.listen;
            units.push(spawn_unit(
                &dir,
                RoleConfig::Dataplane(cfg),
                "dataplane",
                &host,
                ep,
            )?);
        }
        for cfg in dcfgs {
            let ep = cfg.listen;
            units.push(spawn_unit(
                &dir,
                RoleConfig::Dispatcher(cfg),
                "dispatcher",
                &lab.dispatcher_ns(1),
                ep,
            )?);
        }
        write_units(&dir, &units)?;
        for u in &mut units {
            wait_ready(u, &stop)?;
        }
        Ok(())
    })();
    if let Err(e) = started {
        stop_units(&mut units);
        let _ = std::fs::remove_dir_all(&dir);
        return Err(e);
    }
    println!(
        "appliance {} ready in lab {} (run dir {})",
        spec.name(),
        opts.prefix,
        dir.display()
    );
    for u in &units {
        println!(
            "  unit {:>3}  {:<10}  host {:<14}  pid {:<7}  backplane {}",
            u.record.id, u.record.role, u.record.host, u.record.pid, u.record.backplane
        );
    }
    println!(
        "stats: dva stats {} --prefix {}   stop: Ctrl-C",
        spec.name(),
        opts.prefix
    );

    while !stop.load(Ordering::Relaxed) {
        for u in &mut units {
            if let Ok(Some(status)) = u.child.try_wait() {
                if u.record.pid != 0 {
                    eprintln!(
                        "dva: unit {} ({}) exited with {status}; see {}",
                        u.record.id,
                        u.record.role,
                        u.record.log.display()
                    );
                    u.record.pid = 0;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("stopping appliance {}", spec.name());
    stop_units(&mut units);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn spawn_unit(
    dir: &Path,
    cfg: RoleConfig,
    role: &str,
    host: &str,
    backplane: SocketAddr,
) -> anyhow::Result<Unit> {
    let id = cfg.unit();
    let cfg_path = dir.join(format!("unit-{id}.json"));
    let control = dir.join(format!("unit-{id}.sock"));
    let log = dir.join(format!("unit-{id}.log"));
    std::fs::write(&cfg_path, serde_json::to_vec_pretty(&cfg)?)?;
    let exe = std::env::current_exe().context("locating the dva binary")?;
    let logf = std::fs::File::create(&log)?;
    let child = Command::new(exe)
        .args([
            "unit",
            "--role",
            role,
            "--die-with-parent",
            "--netns",
            host,
            "--config",
        ])
        .arg(&cfg_path)
        .arg("--control")
        .arg(&control)
        .stdin(Stdio::null())
        .stdout(logf.try_clone()?)
        .stderr(logf)
        .spawn()
        .with_context(|| format!("starting {role} unit {id} on {host}"))?;
    let pid = child.id();
    Ok(Unit {
        record: UnitRecord {
            id,
            role: role.into(),
            host: host.into(),
            pid,
            backplane,
            control,
            log,
        },
        child,
    })
}

fn wait_ready(u: &mut Unit, stop: &AtomicBool) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok((200, _)) =
            dva_unit::control::get(&u.record.control, "/ready", Duration::from_secs(1))
        {
            return Ok(());
        }
        if let Ok(Some(status)) = u.child.try_wait() {
            let log = std::fs::read_to_string(&u.record.log).unwrap_or_default();
            bail!(
                "{} unit {} exited ({status}) before it was ready:\n{}",
                u.record.role,
                u.record.id,
                log.trim_end()
            );
        }
        if Instant::now() > deadline || stop.load(Ordering::Relaxed) {
            bail!(
                "{} unit {} not ready after {:?}; see {}",
                u.record.role,
                u.record.id,
                READY_TIMEOUT,
                u.record.log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stop_units(units: &mut [Unit]) {
    for u in units.iter() {
        // SAFETY: kill(2) with a pid we spawned and a signal number; no memory is involved.
        unsafe {
            libc::kill(u.child.id() as libc::pid_t, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    for u in units.iter_mut() {
        loop {
            match u.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() > deadline => {
                    let _ = u.child.kill();
                    let _ = u.child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

fn write_units(dir: &Path, units: &[Unit]) -> anyhow::Result<()> {
    let recs: Vec<&UnitRecord> = units.iter().map(|u| &u.record).collect();
    let tmp = dir.join("units.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&recs)?)?;
    std::fs::rename(&tmp, dir.join("units.json"))?;
    Ok(())
}

fn read_units(dir: &Path) -> anyhow::Result<Vec<UnitRecord>> {
    let text = std::fs::read_to_string(dir.join("units.json"))?;
    Ok(serde_json::from_str(&text)?)
}

fn pid_alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    pid != 0 && unsafe { libc::kill(pid as libc::pid_t, 0) } == 0
}

/// `dva stats NAME`: every unit's counters, from its control socket.
pub fn stats(name: &str, prefix: &str, json: bool) -> anyhow::Result<()> {
    let dir = run_dir(prefix, name);
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
                u.pid,
                s.rx_packets,
                s.tx_packets,
                s.flows,
                s.total_drops()
            ),
            Err(e) => println!(
                "{:>4}  {:<10}  {:<14}  {:>7}  unreachable: {e}",
                u.id, u.role, u.host, u.pid
            ),
        }
    }
    Ok(())
}
