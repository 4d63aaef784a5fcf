//! `dva demo` and `dva bench forwarding`: the lab, real servers and clients, the appliance in
//! between, and what happened printed as figures.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use dva_lab::apps::{self, Iperf3Server, Nginx, StreamServer};
use dva_lab::{Lab, LabSpec};
use dva_mgmt::{ApplianceView, Mgmt, MgmtOptions, ScaleRequest, UnitRole, UnitState};

use crate::bench_lab::Appliance;

/// Removes the lab on drop, so an error or Ctrl-C path still cleans up.
pub(crate) struct LabGuard(pub(crate) String);
impl Drop for LabGuard {
    fn drop(&mut self) {
        let _ = Lab::down(&self.0);
    }
}

pub(crate) fn spec_path(name: &str) -> anyhow::Result<PathBuf> {
    // Next to the binary's source tree when run from a checkout; else the working directory.
    let candidates = [
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../examples")
            .join(name),
        PathBuf::from("examples").join(name),
    ];
    candidates
        .into_iter()
        .find(|p| p.exists())
        .with_context(|| format!("examples/{name} not found"))
}

fn step(s: &str) {
    println!("\n== {s}");
}

/// One line per unit: what `dva get NAME` shows.
fn print_view(v: &ApplianceView) {
    println!(
        "appliance {}: {:?}, config version {}, data planes {} ready / {} desired / {} draining",
        v.name,
        v.status,
        v.config_version,
        v.dataplanes.ready,
        v.dataplanes.desired,
        v.dataplanes.draining
    );
    println!(
        "  {:>3}  {:<10}  {:<14}  {:<9}  {:>7}  {:>10}  {:>6}  {:>7}",
        "ID", "ROLE", "HOST", "STATE", "PID", "PACKETS", "FLOWS", "BUCKETS"
    );
    for u in &v.units {
        println!(
            "  {:>3}  {:<10}  {:<14}  {:<9}  {:>7}  {:>10}  {:>6}  {:>7}",
            u.id,
            u.role.as_str(),
            u.host,
            format!("{:?}", u.state).to_lowercase(),
            u.pid.unwrap_or(0),
            u.packets,
            u.flows,
            u.buckets
                .map(|b| b.to_string())
                .unwrap_or_else(|| "-".into())
        );
    }
}

/// Wait for `f` on the appliance's view, printing a one-line timeline every second meanwhile.
fn wait_view(
    mgmt: &Mgmt,
    t0: Instant,
    what: &str,
    timeout: Duration,
    mut f: impl FnMut(&ApplianceView) -> bool,
) -> anyhow::Result<ApplianceView> {
    let deadline = Instant::now() + timeout;
    let mut last_line = Instant::now();
    loop {
        let v = mgmt.get("edge-fw").map_err(|e| anyhow::anyhow!("{e}"))?;
        if f(&v) {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!(
                "{what}: not within {timeout:?} (status {:?}, error {:?})",
                v.status,
                v.error
            );
        }
        if last_line.elapsed() >= Duration::from_secs(1) {
            last_line = Instant::now();
            timeline(t0, &v);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn timeline(t0: Instant, v: &ApplianceView) {
    let dps: Vec<String> = v
        .units
        .iter()
        .filter(|u| u.role == UnitRole::Dataplane)
        .map(|u| {
            format!(
                "dp{}[{}{} flows]",
                u.id,
                match u.state {
                    UnitState::Ready => "",
                    UnitState::Draining => "draining ",
                    UnitState::Starting => "starting ",
                    _ => "stopping ",
                },
                u.flows
            )
        })
        .collect();
    println!(
        "  t={:>5.1}s  v{}  {}",
        t0.elapsed().as_secs_f64(),
        v.config_version,
        dps.join(" ")
    );
}

pub fn demo(prefix: &str, secs: u32) -> anyhow::Result<()> {
    let spec_file = spec_path("edge-firewall.yaml")?;
    let spec_text = std::fs::read_to_string(&spec_file)?;
    step("building the lab: client, 3 servers, a dispatcher host and 2 data-plane hosts");
    let lab = Lab::up(&LabSpec {
        prefix: prefix.to_string(),
        servers: 3,
        hosts: 2,
        dispatchers: 1,
        control: false,
    })?;
    let _lab_guard = LabGuard(prefix.to_string());
    print!("{}", lab.describe());
    let mut servers = Vec::new();
    for k in 1..=lab.servers {
        servers.push(Nginx::start(
            &lab.server_ns(k),
            &[80, 8080],
            &format!("hello from server{k}\n"),
        )?);
    }
    let _iperf = Iperf3Server::start(&lab.server_ns(1), 5201)?;
    let _streams_server = StreamServer::start(&lab.server_ns(2), 5201)?;

    step("starting the management tool and applying examples/edge-firewall.yaml with 1 data plane");
    let state = PathBuf::from("/run/dva").join(format!("{prefix}demo.state"));
    let _ = std::fs::remove_dir_all(&state);
    let mgmt = Mgmt::open_in(
        MgmtOptions::new(state.clone(), prefix)?,
        Box::new(dva_lab::LabHosts::new(prefix)),
    )?;
    let _mgmt_guard = MgmtGuard(mgmt.clone(), state);
    mgmt.apply(&spec_text).map_err(|e| anyhow::anyhow!("{e}"))?;
    mgmt.scale(
        "edge-fw",
        &ScaleRequest {
            dataplanes: 1,
            drain_deadline: Some("60s".into()),
        },
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let t0 = Instant::now();
    let v = crate::run::wait_ready(&mgmt, "edge-fw", Duration::from_secs(30))?;
    println!("ready in {:.2} s", t0.elapsed().as_secs_f64());
    print_view(&v);
    let client = lab.client_ns();

    step("traffic through the appliance");
    for k in 1..=lab.servers {
        let url = format!("http://{}/", Lab::server_addr(k));
        let body = apps::curl(&client, &url, 5)?;
        println!("curl {url} from the client -> {}", body.trim());
    }
    let s1 = IpAddr::V4(Lab::server_addr(1));
    let s2 = IpAddr::V4(Lab::server_addr(2));
    let blocked = apps::tcp_connect(&client, s1, 8080, 2)?;
    println!(
        "TCP {s1}:8080 from the client (not allowed by the spec) -> {}",
        if blocked {
            "CONNECTED (unexpected!)"
        } else {
            "blocked"
        }
    );
    println!(
        "ping {s1} from the client -> {}",
        if apps::ping(&client, s1, 3, 5)? {
            "ok"
        } else {
            "FAILED"
        }
    );

    let secs = secs.max(12);
    let n_streams = 10;
    step(&format!(
        "live scaling: long-lived TCP connections (every byte checked) to {s2}:5201 and iperf3 to \
         {s1}:5201, while data planes go 1 -> 3 -> 1"
    ));
    let dst = std::net::SocketAddr::new(s2, 5201);
    let t0 = Instant::now();
    println!(
        "  t={:>5.1}s  {n_streams} connections start ({secs} s each), and iperf3",
        t0.elapsed().as_secs_f64()
    );
    let streams = apps::start_streams(
        &client,
        dst,
        n_streams,
        Duration::from_secs(u64::from(secs)),
        100_000,
    );
    let iperf = {
        let client = client.clone();
        let secs = secs.saturating_sub(4);
        std::thread::spawn(move || apps::iperf3_client(&client, s1, 5201, secs, 1, false, None))
    };
    std::thread::sleep(Duration::from_secs(2));
    println!(
        "  t={:>5.1}s  dva scale edge-fw --dataplanes 3",
        t0.elapsed().as_secs_f64()
    );
    mgmt.scale(
        "edge-fw",
        &ScaleRequest {
            dataplanes: 3,
            drain_deadline: None,
        },
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let v = wait_view(&mgmt, t0, "scale-out", Duration::from_secs(30), |v| {
        v.dataplanes.ready == 3 && v.status == dva_mgmt::ApplianceStatus::Ready
    })?;
    println!(
        "  t={:>5.1}s  3 data planes serving (config version {}); {n_streams} more connections start",
        t0.elapsed().as_secs_f64(),
        v.config_version
    );
    let later_secs = u64::from(secs) - 6;
    let streams2 = apps::start_streams(
        &client,
        dst,
        n_streams,
        Duration::from_secs(later_secs),
        100_000,
    );
    let scale_in_at = Duration::from_secs(u64::from(secs) / 2);
    while t0.elapsed() < scale_in_at {
        std::thread::sleep(Duration::from_secs(1));
        timeline(
            t0,
            &mgmt.get("edge-fw").map_err(|e| anyhow::anyhow!("{e}"))?,
        );
    }
    println!(
        "  t={:>5.1}s  dva scale edge-fw --dataplanes 1   (the removed data planes drain: no new \
         flows, their open connections still served)",
        t0.elapsed().as_secs_f64()
    );
    mgmt.scale(
        "edge-fw",
        &ScaleRequest {
            dataplanes: 1,
            drain_deadline: None,
        },
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let v = wait_view(
        &mgmt,
        t0,
        "scale-in",
        Duration::from_secs(u64::from(secs) + 60),
        |v| {
            v.dataplanes.ready == 1
                && v.status == dva_mgmt::ApplianceStatus::Ready
                && v.dataplanes.draining == 0
                && v.units.iter().all(|u| u.state != UnitState::Stopped)
        },
    )?;
    println!(
        "  t={:>5.1}s  back to 1 data plane: the removed ones served their connections to the end, then exited",
        t0.elapsed().as_secs_f64()
    );
    let mut results = streams
        .join()
        .map_err(|_| anyhow::anyhow!("stream threads panicked"))?;
    results.extend(
        streams2
            .join()
            .map_err(|_| anyhow::anyhow!("stream threads panicked"))?,
    );
    let intact = results.iter().filter(|r| r.intact()).count();
    let bytes: u64 = results.iter().map(|r| r.received).sum();
    println!(
        "\nlong-lived connections: {intact}/{} completed intact ({:.1} MB checked byte by byte){}",
        results.len(),
        bytes as f64 / 1e6,
        if intact == results.len() {
            ""
        } else {
            "  <-- BROKEN CONNECTIONS"
        }
    );
    for r in results.iter().filter(|r| !r.intact()) {
        println!("  connection {}: {:?}", r.index, r);
    }
    match iperf.join() {
        Ok(Ok(r)) => println!(
            "iperf3 during the scaling: {:.2} Gbit/s, {} retransmits",
            r.received_bps / 1e9,
            r.retransmits
        ),
        Ok(Err(e)) => println!("iperf3 during the scaling: FAILED: {e}"),
        Err(_) => println!("iperf3 during the scaling: thread panicked"),
    }

    step("the appliance now (dva get edge-fw)");
    print_view(&v);
    step("what the management tool did (dva events edge-fw)");
    for e in mgmt.events("edge-fw").map_err(|e| anyhow::anyhow!("{e}"))? {
        println!("  {:<14} {}", e.reason, e.message);
    }
    step("per-unit counters (dva stats edge-fw)");
    crate::run::stats("edge-fw", prefix, false)?;

    step("deleting the appliance and removing the lab");
    drop(servers);
    Ok(())
}

/// Deletes the demo's appliances and store on drop (also on error paths).
pub(crate) struct MgmtGuard(pub(crate) Mgmt, pub(crate) PathBuf);
impl Drop for MgmtGuard {
    fn drop(&mut self) {
        for v in self.0.list() {
            let _ = self.0.delete(&v.name);
        }
        self.0.shutdown();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

/// iperf3 through the kernel's own forwarding, then through dva, in the same lab and run.
pub fn bench_forwarding(prefix: &str, secs: u32, streams: u32) -> anyhow::Result<()> {
    let spec = spec_path("edge-firewall.yaml")?;
    let lab = Lab::up(&LabSpec {
        prefix: prefix.to_string(),
        servers: 1,
        hosts: 2,
        dispatchers: 1,
        control: false,
    })?;
    let _lab_guard = LabGuard(prefix.to_string());
    let client = lab.client_ns();
    let s1 = IpAddr::V4(Lab::server_addr(1));
    let _iperf = Iperf3Server::start(&lab.server_ns(1), 5201)?;

    lab.set_kernel_router(true)?;
    let kernel = apps::iperf3_client(&client, s1, 5201, secs, streams, false, None)?;
    lab.set_kernel_router(false)?;

    let mut rows = vec![("kernel forwarding (no rules)", kernel)];
    for dps in [1u32, 2] {
        let app = Appliance::start_echoed(&spec, prefix, dps)?;
        let r = apps::iperf3_client(&client, s1, 5201, secs, streams, false, None)?;
        drop(app);
        rows.push((
            if dps == 1 {
                "dva edge-fw, 1 data plane"
            } else {
                "dva edge-fw, 2 data planes"
            },
            r,
        ));
    }
    println!("\niperf3 TCP, {streams} stream(s), {secs} s, client -> server1, same lab, offloads off (see README)");
    println!(
        "{:<32} {:>12} {:>12} {:>10}",
        "path", "Gbit/s", "retransmits", "vs kernel"
    );
    let base = rows[0].1.received_bps.max(1.0);
    for (name, r) in &rows {
        println!(
            "{:<32} {:>12.3} {:>12} {:>9.2}x",
            name,
            r.received_bps / 1e9,
            r.retransmits,
            r.received_bps / base
        );
    }
    Ok(())
}
