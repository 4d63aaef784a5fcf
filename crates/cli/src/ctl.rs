//! The kubectl-like client commands (`dva apply/get/scale/delete/events/units`) and `dva serve`.
//!
//! The server and token come from `--server`/`--token`, else `DVA_SERVER`/`DVA_TOKEN`, else the
//! client file `dva serve` writes (`$DVA_CLIENT_CONFIG` or `~/.dva/client.json`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use dva_mgmt::api::{self, ClientConfig};
use dva_mgmt::client::Client;
use dva_mgmt::store::StoreConfig;
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

/// `dva serve`'s flags.
pub struct ServeOptions {
    pub state: PathBuf,
    pub store: StoreConfig,
    pub listen: SocketAddr,
    pub advertise: Option<SocketAddr>,
    pub place: crate::run::Place,
    pub write_client: bool,
}

pub fn serve(o: &ServeOptions) -> anyhow::Result<()> {
    let (state, place, write_client) = (o.state.as_path(), &o.place, o.write_client);
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
    let local_token = api::load_or_create_token(state)?;
    let mut opts = place.options(state.to_path_buf())?;
    opts.store = o.store.clone();
    let mgmt = Mgmt::open(opts)?;
    // Replicas on one etcd accept one token: the first to start puts its own there, the others
    // take it (and keep it in their own state dir too, where the CLI and the web view look).
    let token = mgmt.share_token(&local_token)?;
    if token != local_token {
        api::save_token(state, &token)?;
    }
    let server = api::serve(mgmt.clone(), o.listen, token.clone())?;
    let url = format!("http://{}", server.local_addr());
    if let StoreConfig::Etcd(endpoints) = &o.store {
        let advertise = o.advertise.unwrap_or(server.local_addr());
        mgmt.campaign(advertise.to_string());
        println!(
            "dva serve: records in etcd at {}; campaigning for leadership (advertising {advertise})",
            endpoints.join(",")
        );
    }
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
    // The token itself stays out of the output (logs): the fragment is for the user to fill in.
    println!(
        "dva serve: live web view at {url}/ui#token=<the token in {}>",
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

/// How `get`, `events` and `units` print: kubectl's `-o` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Table,
    Wide,
    Json,
    Yaml,
}

/// Print `v` as JSON or YAML; false for the table formats (the caller prints those).
fn structured<T: serde::Serialize>(v: &T, f: Format) -> anyhow::Result<bool> {
    match f {
        Format::Json => println!("{}", serde_json::to_string_pretty(v)?),
        Format::Yaml => print!(
            "{}",
            serde_saphyr::to_string(v).map_err(|e| anyhow::anyhow!("YAML: {e}"))?
        ),
        Format::Table | Format::Wide => return Ok(false),
    }
    Ok(true)
}

/// The specs `-f` names: a file, every `.yaml`/`.yml`/`.json` of a directory (in name order),
/// or `-` for standard input. Each with where it came from, for messages.
fn read_specs(file: &Path) -> anyhow::Result<Vec<(String, String)>> {
    use std::io::Read;
    if file == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading the spec from standard input")?;
        return Ok(vec![("<stdin>".into(), text)]);
    }
    if file.is_dir() {
        let mut paths: Vec<_> = std::fs::read_dir(file)
            .with_context(|| format!("reading {}", file.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension()
                    .is_some_and(|x| x == "yaml" || x == "yml" || x == "json")
            })
            .collect();
        paths.sort();
        if paths.is_empty() {
            anyhow::bail!("{}: no .yaml, .yml or .json spec in it", file.display());
        }
        return paths
            .into_iter()
            .map(|p| {
                let text = std::fs::read_to_string(&p)
                    .with_context(|| format!("reading {}", p.display()))?;
                Ok((p.display().to_string(), text))
            })
            .collect();
    }
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    Ok(vec![(file.display().to_string(), text)])
}

/// `dva apply -f FILE|DIR|-`: each spec applied; "unchanged" when the appliance already runs
/// exactly that spec (the management tool keeps its generation then).
pub fn apply(t: &Target, file: &Path) -> anyhow::Result<()> {
    let c = client(t)?;
    for (from, text) in read_specs(file)? {
        let name = dva_proto::ApplianceSpec::from_yaml(&text)
            .map(|s| s.name().to_string())
            .with_context(|| format!("invalid spec {from}"))?;
        let before = c.get(&name).ok().map(|v| v.generation);
        let v = c.apply(&text).with_context(|| format!("applying {from}"))?;
        if before == Some(v.generation) {
            println!(
                "appliance {} unchanged (generation {})",
                v.name, v.generation
            );
        } else {
            println!("appliance {} applied (generation {})", v.name, v.generation);
        }
    }
    Ok(())
}

pub fn get(t: &Target, name: Option<&str>, format: Format) -> anyhow::Result<()> {
    let c = client(t)?;
    match name {
        Some(n) => {
            let v = c.get(n)?;
            if !structured(&v, format)? {
                print_view(&v);
            }
        }
        None => {
            let all = c.list()?;
            if structured(&all, format)? {
                return Ok(());
            }
            let wide = format == Format::Wide;
            print!(
                "{:<20} {:<9} {:>10} {:>8}",
                "NAME", "STATUS", "DATAPLANES", "VERSION"
            );
            println!(
                "{}",
                if wide {
                    "  GENERATION UNITS  ERROR"
                } else {
                    ""
                }
            );
            for v in all {
                print!(
                    "{:<20} {:<9} {:>10} {:>8}",
                    v.name,
                    format!("{:?}", v.status).to_lowercase(),
                    format!("{}/{}", v.dataplanes.ready, v.dataplanes.desired),
                    v.config_version
                );
                if wide {
                    print!(
                        "  {:>10} {:>5}  {}",
                        v.generation,
                        v.units.len(),
                        v.error.as_deref().unwrap_or("-")
                    );
                }
                println!();
            }
        }
    }
    Ok(())
}

/// `dva wait NAME --for ready`: until the appliance is ready (every unit up, the config ACKed
/// everywhere), or fail after `timeout`.
pub fn wait_ready(t: &Target, name: &str, timeout: Duration) -> anyhow::Result<()> {
    let c = client(t)?;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let last = match c.get(name) {
            Ok(v) if v.status == dva_mgmt::ApplianceStatus::Ready => {
                println!(
                    "appliance {name} ready (config version {})",
                    v.config_version
                );
                return Ok(());
            }
            Ok(v) => format!(
                "status {:?}{}",
                v.status,
                v.error.map(|e| format!(": {e}")).unwrap_or_default()
            )
            .to_lowercase(),
            Err(e) => e.to_string(),
        };
        if std::time::Instant::now() >= deadline {
            anyhow::bail!("appliance {name} not ready after {timeout:?} ({last})");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
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

/// How often `--watch` asks the management tool again.
const WATCH_EVERY: Duration = Duration::from_millis(250);

pub fn events(t: &Target, name: &str, format: Format, watch: bool) -> anyhow::Result<()> {
    let c = client(t)?;
    let ev = c.events(name)?;
    if !watch && structured(&ev, format)? {
        return Ok(());
    }
    let line = |e: &dva_mgmt::Event| -> anyhow::Result<()> {
        match format {
            // One JSON document per line while watching (as `kubectl get -w -o json` streams).
            Format::Json | Format::Yaml if watch => println!("{}", serde_json::to_string(e)?),
            _ => println!("{:>6}  {:<15} {}", age(e.time_ms), e.reason, e.message),
        }
        Ok(())
    };
    if !matches!(format, Format::Json | Format::Yaml) {
        println!("{:>6}  {:<15} MESSAGE", "AGE", "REASON");
    }
    for e in &ev {
        line(e)?;
    }
    if !watch {
        return Ok(());
    }
    // The store keeps the newest events (a bounded list): what is new is what follows the
    // last one we printed.
    let mut last = ev.last().cloned();
    loop {
        std::thread::sleep(WATCH_EVERY);
        let now = c.events(name)?;
        let start = match &last {
            Some(l) => now.iter().rposition(|e| e == l).map_or(0, |i| i + 1),
            None => 0,
        };
        for e in &now[start..] {
            line(e)?;
        }
        if let Some(e) = now.last() {
            last = Some(e.clone());
        }
    }
}

/// `dva get [NAME] --watch`: the listing, then one line per change of an appliance's row
/// (status, data planes ready/desired, config version, error), as `kubectl get -w` does.
pub fn get_watch(t: &Target, name: Option<&str>, format: Format) -> anyhow::Result<()> {
    let c = client(t)?;
    let rows = |c: &Client| -> anyhow::Result<Vec<ApplianceView>> {
        Ok(match name {
            Some(n) => vec![c.get(n)?],
            None => c.list()?,
        })
    };
    let key = |v: &ApplianceView| {
        (
            v.status,
            v.dataplanes.ready,
            v.dataplanes.desired,
            v.config_version,
            v.generation,
            v.error.clone(),
        )
    };
    let print = |v: &ApplianceView| -> anyhow::Result<()> {
        match format {
            Format::Json | Format::Yaml => println!("{}", serde_json::to_string(v)?),
            _ => println!(
                "{:<20} {:<9} {:>10} {:>8}{}",
                v.name,
                format!("{:?}", v.status).to_lowercase(),
                format!("{}/{}", v.dataplanes.ready, v.dataplanes.desired),
                v.config_version,
                v.error
                    .as_deref()
                    .map(|e| format!("  {e}"))
                    .unwrap_or_default()
            ),
        }
        Ok(())
    };
    if !matches!(format, Format::Json | Format::Yaml) {
        println!(
            "{:<20} {:<9} {:>10} {:>8}",
            "NAME", "STATUS", "DATAPLANES", "VERSION"
        );
    }
    let mut seen = std::collections::BTreeMap::new();
    loop {
        for v in rows(&c)? {
            let k = key(&v);
            if seen.get(&v.name) != Some(&k) {
                print(&v)?;
                seen.insert(v.name.clone(), k);
            }
        }
        std::thread::sleep(WATCH_EVERY);
    }
}

pub fn units(t: &Target, name: &str, format: Format) -> anyhow::Result<()> {
    let u = client(t)?.units(name)?;
    if !structured(&u, format)? {
        print_units(&u);
    }
    Ok(())
}
