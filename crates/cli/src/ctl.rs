//! The kubectl-like client commands (`dva apply/get/scale/delete/events/units`) and `dva serve`.
//!
//! The server and token come from `--server`/`--token`, else `DVA_SERVER`/`DVA_TOKEN`, else the
//! client file `dva serve` writes (`$DVA_CLIENT_CONFIG` or `~/.dva/client.json`).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use dva_mgmt::api::{self, ClientConfig};
use dva_mgmt::client::Client;
use dva_mgmt::{now_ms, ApplianceView, Mgmt, ScaleRequest};

pub struct Target {
    pub server: Option<String>,
    pub token: Option<String>,
}

pub fn client(t: &Target) -> anyhow::Result<Client> {
    let file = ClientConfig::default_path();
    let from_file = || ClientConfig::load(&file).ok();
    let server = t
        .server
        .clone()
        .or_else(|| std::env::var("DVA_SERVER").ok())
        .or_else(|| from_file().map(|c| c.server));
    let token = t
        .token
        .clone()
        .or_else(|| std::env::var("DVA_TOKEN").ok())
        .or_else(|| from_file().map(|c| c.token));
    let Some(server) = server else {
        bail!(
            "no management server: start one with `dva serve`, or give --server / DVA_SERVER (no client file at {})",
            file.display()
        );
    };
    Client::new(&server, token)
}

pub fn serve(
    state: &Path,
    listen: SocketAddr,
    place: &crate::run::Place,
    write_client: bool,
) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
    let token = api::load_or_create_token(state)?;
    let mgmt = Mgmt::open(place.options(state.to_path_buf())?)?;
    let server = api::serve(mgmt.clone(), listen, token.clone())?;
    let url = format!("http://{}", server.local_addr());
    if write_client {
        let path = ClientConfig::default_path();
        ClientConfig {
            server: url.clone(),
            token,
        }
        .save(&path)?;
        println!("dva serve: client config written to {}", path.display());
    }
    println!(
        "dva serve: listening on {url} (state {}, units on {}; token in {})",
        state.display(),
        place.describe(),
        state.join("token").display()
    );
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("dva serve: stopping (the appliances' units keep running; a restart adopts them)");
    server.stop();
    mgmt.shutdown();
    Ok(())
}

fn age(ms: u64) -> String {
    let s = now_ms().saturating_sub(ms) / 1000;
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        _ => format!("{}h", s / 3600),
    }
}

fn print_view(v: &ApplianceView) {
    println!(
        "NAME {}  STATUS {:?}  CONFIG VERSION {}  GENERATION {}  DATA PLANES {}/{} (draining {}, min {}, max {})",
        v.name,
        v.status,
        v.config_version,
        v.generation,
        v.dataplanes.ready,
        v.dataplanes.desired,
        v.dataplanes.draining,
        v.dataplanes.min,
        v.dataplanes.max
    );
    if let Some(e) = &v.error {
        println!("ERROR {e}");
    }
    print_units(&v.units);
    if !v.backends.is_empty() {
        println!(
            "\n{:<16} {:<16} {:<6} {:<7} ERROR",
            "SERVICE", "BACKEND", "HEALTH", "CHECKS"
        );
        for b in &v.backends {
            println!(
                "{:<16} {:<16} {:<6} {:<7} {}",
                b.service,
                b.backend,
                b.health,
                format!("{}/{}", b.up_votes, b.checks),
                b.error.as_deref().unwrap_or("")
            );
        }
    }
}

fn print_units(units: &[dva_mgmt::UnitView]) {
    println!(
        "{:>4}  {:<10}  {:<16}  {:<9}  {:>7}  {:>7}  {:>12}  {:>7}  {:>7}  LEADER",
        "ID", "ROLE", "HOST", "STATE", "PID", "VERSION", "PACKETS", "FLOWS", "BUCKETS"
    );
    for u in units {
        println!(
            "{:>4}  {:<10}  {:<16}  {:<9}  {:>7}  {:>7}  {:>12}  {:>7}  {:>7}  {}",
            u.id,
            u.role.as_str(),
            u.host,
            format!("{:?}", u.state).to_lowercase(),
            u.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            u.config_version,
            u.packets,
            u.flows,
            u.buckets
                .map(|b| b.to_string())
                .unwrap_or_else(|| "-".into()),
            match u.leader {
                Some(true) => "yes",
                Some(false) => "no",
                None => "",
            }
        );
    }
}

pub fn apply(t: &Target, file: &Path) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let v = client(t)?.apply(&text)?;
    println!("appliance {} applied (generation {})", v.name, v.generation);
    Ok(())
}

pub fn get(t: &Target, name: Option<&str>, json: bool) -> anyhow::Result<()> {
    let c = client(t)?;
    match name {
        Some(n) => {
            let v = c.get(n)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_view(&v);
            }
        }
        None => {
            let all = c.list()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
                return Ok(());
            }
            println!(
                "{:<20} {:<9} {:>10} {:>8}",
                "NAME", "STATUS", "DATAPLANES", "VERSION"
            );
            for v in all {
                println!(
                    "{:<20} {:<9} {:>10} {:>8}",
                    v.name,
                    format!("{:?}", v.status).to_lowercase(),
                    format!("{}/{}", v.dataplanes.ready, v.dataplanes.desired),
                    v.config_version
                );
            }
        }
    }
    Ok(())
}

pub fn scale(
    t: &Target,
    name: &str,
    dataplanes: u32,
    deadline: Option<String>,
) -> anyhow::Result<()> {
    let v = client(t)?.scale(
        name,
        &ScaleRequest {
            dataplanes,
            drain_deadline: deadline,
        },
    )?;
    println!(
        "appliance {} scaling to {} data plane(s) (generation {})",
        v.name, v.dataplanes.desired, v.generation
    );
    Ok(())
}

pub fn delete(t: &Target, name: &str) -> anyhow::Result<()> {
    client(t)?.delete(name)?;
    println!("appliance {name} deleted");
    Ok(())
}

pub fn events(t: &Target, name: &str, json: bool) -> anyhow::Result<()> {
    let ev = client(t)?.events(name)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&ev)?);
        return Ok(());
    }
    println!("{:>6}  {:<15} MESSAGE", "AGE", "REASON");
    for e in ev {
        println!("{:>6}  {:<15} {}", age(e.time_ms), e.reason, e.message);
    }
    Ok(())
}

pub fn units(t: &Target, name: &str, json: bool) -> anyhow::Result<()> {
    let u = client(t)?.units(name)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&u)?);
    } else {
        print_units(&u);
    }
    Ok(())
}
