//! `dva bench chaos`: under the elasticity benchmark's traffic (long-lived TCP connections with
//! every byte checked, short HTTP connections, UDP echo streams), kill -9 a random unit — a data
//! plane, the dispatcher or the leading manager — every few seconds, a bounded number of times,
//! and report flows broken, datagrams lost, and how long the appliance took to be back to its
//! layout after each kill.
//!
//! What to expect (DESIGN.md §1–2): a data plane's flows survive on the buckets' backups (state
//! replication); a dispatcher holds no flow state, so its replacement resumes where it left (the
//! packets in flight during the gap are lost, TCP retransmits them); a standby manager takes over
//! the leader's role with the running config version and table.

use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use dva_lab::apps::{Nginx, StreamServer, UdpEchoServer};
use dva_lab::{Lab, LabSpec};
use dva_mgmt::{ApplianceStatus, ApplianceView, Mgmt, MgmtOptions, UnitRole, UnitState};

use crate::bench_elasticity::{finish, start_traffic};

pub struct Options {
    pub prefix: String,
    pub kills: u32,
    /// Seconds between kills.
    pub every: u32,
    pub seed: u64,
    /// Kill only units of this role.
    pub only: Option<UnitRole>,
    /// Also draw the kills and recoveries into this SVG file (docs/chaos.svg).
    pub svg: Option<std::path::PathBuf>,
}

struct Kill {
    at: f64,
    role: UnitRole,
    unit: u32,
    flows: u64,
    recovery: Duration,
}

/// xorshift64*: a repeatable choice of victims from `--seed`.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// The highly available edge firewall: 2 dispatchers behind the lab's ECMP routers, 2 managers,
/// 3 data planes.
fn ha_spec() -> anyhow::Result<String> {
    Ok(std::fs::read_to_string(crate::demo::spec_path(
        "edge-firewall-ha.yaml",
    )?)?)
}

const NAME: &str = "edge-fw-ha";

fn get(mgmt: &Mgmt) -> anyhow::Result<ApplianceView> {
    mgmt.get(NAME).map_err(|e| anyhow!("{e}"))
}

fn wait(
    mgmt: &Mgmt,
    what: &str,
    timeout: Duration,
    f: impl Fn(&ApplianceView) -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let v = get(mgmt)?;
        if f(&v) {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "{what}: not within {timeout:?} ({:?}, {:?})",
                v.dataplanes,
                v.error
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn back_to_layout(v: &ApplianceView) -> bool {
    v.status == ApplianceStatus::Ready
        && v.dataplanes.ready == v.dataplanes.desired
        && v.units
            .iter()
            .filter(|u| u.role == UnitRole::Manager && u.state == UnitState::Ready)
            .count()
            == 2
        && v.units
            .iter()
            .filter(|u| u.role == UnitRole::Dispatcher && u.state == UnitState::Ready)
            .count()
            == 2
        && v.units.iter().any(|u| u.leader == Some(true))
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    let prefix = opts.prefix.as_str();
    let kills = opts.kills.clamp(1, 30);
    let every = opts.every.max(3);
    let lab = Lab::up(&LabSpec {
        prefix: prefix.to_string(),
        servers: 3,
        hosts: 2,
        dispatchers: 2,
        control: false,
    })?;
    let _lab_guard = crate::demo::LabGuard(prefix.to_string());
    let _web = Nginx::start(&lab.server_ns(1), &[80], "ok\n")?;
    let _streams = StreamServer::start(&lab.server_ns(2), 5201).context("stream server")?;
    let _echo = UdpEchoServer::start(&lab.server_ns(3), 5300).context("udp echo server")?;
    let client = lab.client_ns();
    let state = std::path::PathBuf::from("/run/dva").join(format!("{prefix}chaos.state"));
    let _ = std::fs::remove_dir_all(&state);
    let mgmt = Mgmt::open_in(
        MgmtOptions::new(state.clone(), prefix)?,
        Box::new(dva_lab::LabHosts::new(prefix)),
    )?;
    let _guard = crate::demo::MgmtGuard(mgmt.clone(), state);
    mgmt.apply(&ha_spec()?).map_err(|e| anyhow!("{e}"))?;
    wait(&mgmt, "ready", Duration::from_secs(30), back_to_layout)?;

    let secs = u64::from(kills * every) + 6;
    println!(
        "\n== chaos: {kills} kill -9 of a random unit every {every} s (seed {}), under 30 checked TCP \
         connections, wrk and 10 UDP echo streams, {secs} s; 3 data planes, 2 managers, 2 dispatchers behind ECMP routers",
        opts.seed
    );
    let traffic = start_traffic(&client, secs, 30, 10, 200, true);
    let t0 = Instant::now();
    let mut rng = Rng(opts.seed.max(1));
    let mut log = Vec::new();
    std::thread::sleep(Duration::from_secs(3));
    for _ in 0..kills {
        let v = get(&mgmt)?;
        let mut role = match rng.next() % 3 {
            0 => UnitRole::Dataplane,
            1 => UnitRole::Dispatcher,
            _ => UnitRole::Manager,
        };
        if let Some(only) = &opts.only {
            role = *only;
        }
        let victims: Vec<_> = v
            .units
            .iter()
            .filter(|u| {
                u.role == role
                    && u.state == UnitState::Ready
                    && (role != UnitRole::Manager || u.leader == Some(true))
            })
            .collect();
        if victims.is_empty() {
            continue;
        }
        let u = victims[(rng.next() % victims.len() as u64) as usize];
        let (unit, pid, flows) = (u.id, u.pid.unwrap_or(0), u.flows);
        let at = t0.elapsed().as_secs_f64();
        println!(
            "  t={at:>6.1}s  kill -9 {} {unit} (pid {pid}, {flows} flows)",
            role.as_str()
        );
        // SAFETY: kill(2) on a unit process this benchmark's management tool started.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGKILL);
        }
        let start = Instant::now();
        wait(&mgmt, "recovery", Duration::from_secs(30), |v| {
            !v.units.iter().any(|x| x.id == unit) && back_to_layout(v)
        })?;
        let recovery = start.elapsed();
        println!(
            "  t={:>6.1}s  back to the layout in {:.2} s",
            t0.elapsed().as_secs_f64(),
            recovery.as_secs_f64()
        );
        log.push(Kill {
            at,
            role,
            unit,
            flows,
            recovery,
        });
        let next = Duration::from_secs_f64(at + f64::from(every));
        if let Some(left) = next.checked_sub(t0.elapsed()) {
            std::thread::sleep(left);
        }
    }
    let (r, broken) = finish_detail(traffic)?;
    println!(
        "\n== results (dva bench chaos, lab {prefix}, {} cores)",
        crate::bench_elasticity::num_cpus()
    );
    println!(
        "{:>7}  {:<10} {:>5} {:>6} {:>10}",
        "t", "killed", "unit", "flows", "recovery"
    );
    for k in &log {
        println!(
            "{:>6.1}s  {:<10} {:>5} {:>6} {:>9.2}s",
            k.at,
            k.role.as_str(),
            k.unit,
            k.flows,
            k.recovery.as_secs_f64()
        );
    }
    println!(
        "TCP connections broken: {}/{}   HTTP requests {} errors {}   UDP sent {} lost {} ({:.3}%) reordered {}   RTT p50 {} us max {} us",
        r.tcp_broken,
        r.tcp_total,
        r.http_requests,
        r.http_errors,
        r.udp_sent,
        r.udp_lost,
        r.udp_lost as f64 * 100.0 / r.udp_sent.max(1) as f64,
        r.udp_reordered,
        r.rtt_p50_us,
        r.rtt_max_us
    );
    for b in broken.iter().take(5) {
        println!("  broken: {b}");
    }
    if let Some(path) = &opts.svg {
        let kills: Vec<crate::chart::Recovery> = log
            .iter()
            .map(|k| crate::chart::Recovery {
                at: k.at,
                label: format!("{} {}", k.role.as_str(), k.unit),
                seconds: k.recovery.as_secs_f64(),
            })
            .collect();
        let title = "dva bench chaos: kill -9 under traffic, and the time back to the layout";
        let subtitle = format!(
            "{}/{} checked TCP connections broken, {} HTTP errors, {} of {} UDP datagrams lost ({} cores)",
            r.tcp_broken,
            r.tcp_total,
            r.http_errors,
            r.udp_lost,
            r.udp_sent,
            crate::bench_elasticity::num_cpus()
        );
        std::fs::write(
            path,
            crate::chart::recovery_timeline(title, &subtitle, secs as f64, &kills),
        )
        .with_context(|| format!("writing {}", path.display()))?;
        println!("chart: {}", path.display());
    }
    Ok(())
}

fn finish_detail(
    t: crate::bench_elasticity::Traffic,
) -> anyhow::Result<(crate::bench_elasticity::PhaseResult, Vec<String>)> {
    finish("chaos", "", t, Vec::new()).map(|r| {
        let b = r.broken_detail.clone();
        (r, b)
    })
}
