//! `dva demo` and `dva bench forwarding`: the lab, real servers and clients, the appliance in
//! between, and what happened printed as figures.

use std::io::{BufRead, BufReader};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use dva_lab::apps::{self, Iperf3Server, Nginx};
use dva_lab::{Lab, LabSpec};

/// `dva run` as a child process, stopped (SIGTERM) on drop.
struct Appliance {
    child: Child,
    dir: PathBuf,
}

impl Appliance {
    fn start(spec: &Path, prefix: &str, name: &str, dataplanes: u32) -> anyhow::Result<Appliance> {
        let exe = std::env::current_exe()?;
        let mut child = Command::new(exe)
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
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting `dva run`")?;
        let out = child.stdout.take().context("dva run stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                println!("  | {l}");
                let _ = tx.send(l);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) if l.contains(" ready in lab") => break,
                Ok(_) => {}
                Err(_) => {
                    let _ = child.kill();
                    bail!("the appliance did not become ready within 30 s");
                }
            }
        }
        Ok(Appliance {
            child,
            dir: crate::run::run_dir(prefix, name),
        })
    }
}

impl Drop for Appliance {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child process.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
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

/// Removes the lab on drop, so an error or Ctrl-C path still cleans up.
struct LabGuard(String);
impl Drop for LabGuard {
    fn drop(&mut self) {
        let _ = Lab::down(&self.0);
    }
}

fn spec_path(name: &str) -> anyhow::Result<PathBuf> {
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

pub fn demo(prefix: &str, secs: u32) -> anyhow::Result<()> {
    let spec = spec_path("edge-firewall.yaml")?;
    step("building the lab: client, 3 servers, a dispatcher host and 2 data-plane hosts");
    let lab = Lab::up(&LabSpec {
        prefix: prefix.to_string(),
        servers: 3,
        hosts: 2,
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

    step("starting appliance edge-fw (examples/edge-firewall.yaml) with 2 data planes");
    let app = Appliance::start(&spec, prefix, "edge-fw", 2)?;
    let client = lab.client_ns();

    step("traffic through the appliance");
    for k in 1..=lab.servers {
        let url = format!("http://{}/", Lab::server_addr(k));
        let body = apps::curl(&client, &url, 5)?;
        println!("curl {url} from the client -> {}", body.trim());
    }
    let s1 = IpAddr::V4(Lab::server_addr(1));
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
    let t0 = Instant::now();
    let mut ok = 0;
    for _ in 0..100 {
        if apps::curl(&client, &format!("http://{s1}/"), 5).is_ok() {
            ok += 1;
        }
    }
    println!(
        "100 short HTTP connections: {ok} ok in {:.2} s",
        t0.elapsed().as_secs_f64()
    );
    let r = apps::iperf3_client(&client, s1, 5201, secs, 1, false, None)?;
    println!(
        "iperf3 TCP client -> server1, {secs} s: {:.2} Gbit/s, {} retransmits",
        r.received_bps / 1e9,
        r.retransmits
    );

    step("per-unit counters (dva stats edge-fw)");
    crate::run::stats("edge-fw", prefix, false)?;
    println!("\nrun dir: {}", app.dir.display());
    println!(
        "(live scale-out/in with the management tool arrives with `dva serve`; see the README)"
    );

    step("stopping the appliance and removing the lab");
    drop(app);
    drop(servers);
    Ok(())
}

/// iperf3 through the kernel's own forwarding, then through dva, in the same lab and run.
pub fn bench_forwarding(prefix: &str, secs: u32, streams: u32) -> anyhow::Result<()> {
    let spec = spec_path("edge-firewall.yaml")?;
    let lab = Lab::up(&LabSpec {
        prefix: prefix.to_string(),
        servers: 1,
        hosts: 2,
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
        let app = Appliance::start(&spec, prefix, "edge-fw", dps)?;
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
