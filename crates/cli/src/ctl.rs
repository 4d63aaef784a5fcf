//! The kubectl-like client commands (`dva apply/get/scale/delete/events/units`), seeing traffic
//! (`dva flows/config/capture/monitor`) and `dva serve`.
//!
//! The server and token come from `--server`/`--token`, else `DVA_SERVER`/`DVA_TOKEN`, else the
//! client file `dva serve` writes (`$DVA_CLIENT_CONFIG` or `~/.dva/client.json`); for an https
//! server, the CA to trust from `--ca`, else `DVA_CA_FILE`, else the client file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use dva_mgmt::api::{self, ClientConfig};
use dva_mgmt::client::Client;
use dva_mgmt::store::StoreConfig;
use dva_mgmt::{now_ms, ApplianceView, ScaleRequest};

pub struct Target {
    pub server: Option<String>,
    pub token: Option<String>,
    /// `--ca FILE`.
    pub ca: Option<PathBuf>,
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
    let ca = ca_pem(
        t.ca.as_deref(),
        std::env::var_os("DVA_CA_FILE")
            .map(PathBuf::from)
            .as_deref(),
        || from_file().and_then(|c| c.ca),
    )?;
    Client::with_ca(&server, token, ca.as_deref())
}

/// The CA an https server must chain to: the file `--ca` names, else the one `DVA_CA_FILE`
/// names, else the client file's. `None`: no CA (fine for http).
fn ca_pem(
    flag: Option<&Path>,
    env: Option<&Path>,
    from_file: impl FnOnce() -> Option<String>,
) -> anyhow::Result<Option<String>> {
    let read = |p: &Path, what: &str| {
        std::fs::read_to_string(p)
            .with_context(|| format!("reading the CA {} ({what})", p.display()))
    };
    Ok(match (flag, env) {
        (Some(p), _) => Some(read(p, "--ca")?),
        (None, Some(p)) => Some(read(p, "DVA_CA_FILE")?),
        (None, None) => from_file(),
    })
}

/// How `dva serve` serves the API.
pub enum ServeTls {
    /// Plain HTTP.
    Off,
    /// TLS with the operator's certificate and key (PEM files).
    Files { cert: PathBuf, key: PathBuf },
    /// TLS with a certificate from the installation CA (`--tls-auto`).
    Auto,
}

/// The names `--tls-auto`'s certificate carries: every way a client may dial this server (the
/// addresses it listens on and advertises to the other replicas, this host's name, loopback).
fn tls_auto_names(listen: SocketAddr, advertise: Option<SocketAddr>) -> Vec<String> {
    let mut names: Vec<String> = ["127.0.0.1", "::1", "localhost"].map(String::from).into();
    for ip in [Some(listen.ip()), advertise.map(|a| a.ip())]
        .into_iter()
        .flatten()
        .filter(|ip| !ip.is_unspecified())
    {
        names.push(ip.to_string());
    }
    // A name a certificate cannot carry (not a DNS name) is left out rather than failing.
    if let Some(host) = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| {
            !h.is_empty()
                && !h.starts_with(['-', '.'])
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        })
    {
        names.push(host);
    }
    names
}

/// How clients on this machine dial `bound`: a wildcard address is reached through loopback
/// (the name a certificate carries, unlike 0.0.0.0).
fn dial_address(bound: SocketAddr) -> SocketAddr {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    match bound.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), bound.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), bound.port())
        }
        _ => bound,
    }
}

/// `dva serve`'s flags.
pub struct ServeOptions {
    pub host_lost_after: Duration,
    pub state: PathBuf,
    pub store: StoreConfig,
    pub listen: SocketAddr,
    pub advertise: Option<SocketAddr>,
    pub place: crate::run::Place,
    pub write_client: bool,
    pub tls: ServeTls,
    /// TLS towards etcd (`--etcd-cafile` and friends).
    pub etcd_tls: Option<dva_mgmt::store::EtcdTls>,
}

pub fn serve(o: &ServeOptions) -> anyhow::Result<()> {
    let (state, place, write_client) = (o.state.as_path(), &o.place, o.write_client);
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
    let local_token = api::load_or_create_token(state)?;
    let mut opts = place.options(state.to_path_buf())?;
    opts.store = o.store.clone();
    opts.host_lost_after = o.host_lost_after;
    if o.etcd_tls.is_some() && !matches!(o.store, StoreConfig::Etcd(_)) {
        anyhow::bail!("--etcd-cafile needs --store etcd://...");
    }
    opts.etcd_tls = o.etcd_tls.clone();
    let mgmt = place.open(opts)?;
    // Replicas on one etcd accept one token: the first to start puts its own there, the others
    // take it (and keep it in their own state dir too, where the CLI and the web view look).
    let token = mgmt.share_token(&local_token)?;
    if token != local_token {
        api::save_token(state, &token)?;
    }
    // The client file's CA: the installation CA with --tls-auto; an operator's own certificate
    // comes with a CA the clients are given (--ca, DVA_CA_FILE).
    let (options, ca) = match &o.tls {
        ServeTls::Off => (api::ServeOptions::default(), None),
        ServeTls::Files { cert, key } => {
            let options = api::ServeOptions {
                tls: Some(api::tls_server_config_from_files(cert, key)?),
                // Replicas forwarding to each other trust this chain (its CA, when the file
                // holds it, or the certificate itself when self-signed).
                forward_ca: std::fs::read_to_string(cert).ok(),
            };
            (options, None)
        }
        ServeTls::Auto => {
            let (config, ca) = api::auto_tls(&mgmt, &tls_auto_names(o.listen, o.advertise))?;
            let options = api::ServeOptions {
                tls: Some(config),
                ..Default::default()
            };
            (options, Some(ca))
        }
    };
    let scheme = if options.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let server = api::serve_with(mgmt.clone(), o.listen, token.clone(), options)?;
    let url = format!("{scheme}://{}", dial_address(server.local_addr()));
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
            ca,
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
    if let ServeTls::Files { cert, .. } = &o.tls {
        println!(
            "dva serve: TLS with {}: clients trust its CA with --ca FILE or DVA_CA_FILE",
            cert.display()
        );
    }
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
pub fn apply(t: &Target, file: &Path, dry_run: bool) -> anyhow::Result<()> {
    let c = client(t)?;
    for (from, text) in read_specs(file)? {
        let name = dva_proto::ApplianceSpec::from_yaml(&text)
            .map(|s| s.name().to_string())
            .with_context(|| format!("invalid spec {from}"))?;
        let before = c.get(&name).ok().map(|v| v.generation);
        if dry_run {
            let v = c
                .apply_dry_run(&text)
                .with_context(|| format!("checking {from}"))?;
            let what = match before {
                None => "created",
                Some(g) if g == v.generation => "unchanged",
                Some(_) => "configured",
            };
            println!(
                "appliance {} {what} (dry run: generation {}, {} data plane(s))",
                v.name, v.generation, v.dataplanes.desired
            );
            continue;
        }
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

/// `dva get hosts`: the machines running `dva agent`.
pub fn get_hosts(t: &Target, format: Format) -> anyhow::Result<()> {
    let hosts = client(t)?.hosts()?;
    if structured(&hosts, format)? {
        return Ok(());
    }
    println!(
        "{:<16} {:<10} {:<22} {:<16} {:>4} {:>8} {:>5}  LABELS",
        "NAME", "STATE", "AGENT", "BACKPLANE", "CPUS", "MEM(MB)", "UNITS"
    );
    for h in hosts {
        let labels: Vec<String> = h
            .record
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        println!(
            "{:<16} {:<10} {:<22} {:<16} {:>4} {:>8} {:>5}  {}",
            h.record.name,
            h.state.as_str(),
            h.record.agent.to_string(),
            h.record.backplane.to_string(),
            h.record.cpus,
            h.record.memory_mb,
            h.units,
            labels.join(",")
        );
    }
    Ok(())
}

/// `dva join-token`: print a one-time token for `dva agent --join-token`.
pub fn join_token(t: &Target) -> anyhow::Result<()> {
    let tok = client(t)?.join_token()?;
    println!("{}", tok.token);
    Ok(())
}

/// `dva agent`: run this machine's agent until SIGTERM or Ctrl-C (its units keep running).
pub fn agent(o: &dva_mgmt::agent::AgentOptions) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
    dva_mgmt::agent::run(o, &stop)
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

/// How long one watch request lasts before the CLI asks again (the server then sends the current
/// state, of which only what changed is printed): a server that vanished without closing the
/// connection is noticed within this (plus a margin) rather than never.
const WATCH_FOR: Duration = Duration::from_secs(300);

/// Follow the server's watch at `path` (with `?watch=true`) for as long as it lasts, again and
/// again, until `on` returns `false` (what it watched is gone: the server ends that watch).
fn follow(
    c: &Client,
    path: &str,
    on: &mut dyn FnMut(&str, serde_json::Value) -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let path = format!("{path}?watch=true&timeoutSeconds={}", WATCH_FOR.as_secs());
    let mut more = true;
    while more {
        let mut any = false;
        c.watch(
            &path,
            WATCH_FOR + Duration::from_secs(30),
            &mut |kind, obj| {
                any = true;
                more &= on(kind, obj)?;
                Ok(())
            },
        )?;
        // An appliance deleted between two watches: the next one is refused (not found).
        if !any {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(())
}

pub fn events(t: &Target, name: &str, format: Format, watch: bool) -> anyhow::Result<()> {
    let c = client(t)?;
    let line = |e: &dva_mgmt::Event| -> anyhow::Result<()> {
        match format {
            // One JSON document per line while watching (as `kubectl get -w -o json` streams).
            Format::Json | Format::Yaml if watch => println!("{}", serde_json::to_string(e)?),
            _ => println!("{:>6}  {:<15} {}", age(e.time_ms), e.reason, e.message),
        }
        std::io::Write::flush(&mut std::io::stdout())?;
        Ok(())
    };
    if !watch {
        let ev = c.events(name)?;
        if structured(&ev, format)? {
            return Ok(());
        }
        println!("{:>6}  {:<15} MESSAGE", "AGE", "REASON");
        for e in &ev {
            line(e)?;
        }
        return Ok(());
    }
    if !matches!(format, Format::Json | Format::Yaml) {
        println!("{:>6}  {:<15} MESSAGE", "AGE", "REASON");
    }
    // The server streams every event, the stored ones first; after a reconnection the stored
    // ones come again, and only those newer than the last printed are.
    let mut last: Option<dva_mgmt::Event> = None;
    let followed = follow(
        &c,
        &format!("/v1/appliances/{name}/events"),
        &mut |_, obj| {
            let e: dva_mgmt::Event = serde_json::from_value(obj)?;
            if last
                .as_ref()
                .is_none_or(|l| e.time_ms > l.time_ms || (e.time_ms == l.time_ms && e != *l))
            {
                line(&e)?;
                last = Some(e);
            }
            Ok(true)
        },
    );
    // The server ends an appliance's event stream when it is deleted; the watch that follows
    // finds it gone: the end of what was watched, as `get --watch` says `deleted`.
    match followed {
        Err(e)
            if e.downcast_ref::<dva_mgmt::client::HttpError>()
                .is_some_and(|h| h.status == 404) =>
        {
            if !matches!(format, Format::Json | Format::Yaml) {
                println!("appliance {name} deleted");
            }
            Ok(())
        }
        r => r,
    }
}

/// `dva get [NAME] --watch`: the listing, then one line per change of an appliance's row
/// (status, data planes ready/desired, config version, error), as `kubectl get -w` does. The
/// server pushes each change as it happens (a watch, not polling), so a scale shows its way.
pub fn get_watch(t: &Target, name: Option<&str>, format: Format) -> anyhow::Result<()> {
    let c = client(t)?;
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
        std::io::Write::flush(&mut std::io::stdout())?;
        Ok(())
    };
    // A missing appliance is an error before anything is printed.
    if let Some(n) = name {
        c.get(n)?;
    }
    if !matches!(format, Format::Json | Format::Yaml) {
        println!(
            "{:<20} {:<9} {:>10} {:>8}",
            "NAME", "STATUS", "DATAPLANES", "VERSION"
        );
    }
    let path = match name {
        Some(n) => format!("/v1/appliances/{n}"),
        None => "/v1/appliances".to_string(),
    };
    let mut seen = std::collections::BTreeMap::new();
    follow(&c, &path, &mut |kind, obj| {
        if kind == "DELETED" {
            let gone = obj["name"].as_str().unwrap_or_default().to_string();
            seen.remove(&gone);
            if !matches!(format, Format::Json | Format::Yaml) {
                println!("{gone:<20} deleted");
            }
            return Ok(name.is_none());
        }
        let v: ApplianceView = serde_json::from_value(obj)?;
        let k = key(&v);
        if seen.get(&v.name) != Some(&k) {
            print(&v)?;
            seen.insert(v.name.clone(), k);
        }
        Ok(true)
    })
}

pub fn units(t: &Target, name: &str, format: Format) -> anyhow::Result<()> {
    let u = client(t)?.units(name)?;
    if !structured(&u, format)? {
        print_units(&u);
    }
    Ok(())
}

/// `dva diff -f FILE|DIR|-`: what applying would change, as a unified diff of the running spec
/// and the new one, both normalised (so comments and formatting do not count). The server checks
/// the new spec first (a dry run). Exit status as kubectl's: 0 no difference, 1 differences.
pub fn diff(t: &Target, file: &Path) -> anyhow::Result<bool> {
    let c = client(t)?;
    let mut differs = false;
    for (from, text) in read_specs(file)? {
        let new = dva_proto::ApplianceSpec::from_yaml(&text)
            .with_context(|| format!("invalid spec {from}"))?;
        c.apply_dry_run(&text)
            .with_context(|| format!("checking {from}"))?;
        let live = match c.get(new.name()) {
            Ok(v) => Some(
                dva_proto::ApplianceSpec::from_yaml(&v.spec)
                    .with_context(|| format!("the running spec of {}", new.name()))?,
            ),
            Err(e) if is_not_found(&e) => None,
            Err(e) => return Err(e),
        };
        let norm = |s: &dva_proto::ApplianceSpec| -> anyhow::Result<Vec<String>> {
            Ok(serde_saphyr::to_string(s)
                .map_err(|e| anyhow::anyhow!("YAML: {e}"))?
                .lines()
                .map(str::to_string)
                .collect())
        };
        let a = live.as_ref().map(norm).transpose()?.unwrap_or_default();
        let b = norm(&new)?;
        if a == b {
            continue;
        }
        differs = true;
        println!("--- {} (running)", new.name());
        println!("+++ {} ({from})", new.name());
        print!("{}", unified_diff(&a, &b, 3));
    }
    Ok(differs)
}

fn is_not_found(e: &anyhow::Error) -> bool {
    e.downcast_ref::<dva_mgmt::client::HttpError>()
        .is_some_and(|h| h.status == 404)
}

/// A unified diff of two line lists (longest common subsequence; specs are small, and beyond
/// 4000 lines a side the whole texts are shown as replaced rather than spending quadratic time).
fn unified_diff(a: &[String], b: &[String], context: usize) -> String {
    #[derive(Clone, Copy, PartialEq)]
    enum Op {
        Same,
        Del,
        Add,
    }
    let mut ops: Vec<(Op, usize, usize)> = Vec::new(); // (op, index in a, index in b)
    if a.len() <= 4000 && b.len() <= 4000 {
        let (n, m) = (a.len(), b.len());
        let mut lcs = vec![vec![0u32; m + 1]; n + 1];
        for i in (0..n).rev() {
            for j in (0..m).rev() {
                lcs[i][j] = if a[i] == b[j] {
                    lcs[i + 1][j + 1] + 1
                } else {
                    lcs[i + 1][j].max(lcs[i][j + 1])
                };
            }
        }
        let (mut i, mut j) = (0, 0);
        while i < n || j < m {
            if i < n && j < m && a[i] == b[j] {
                ops.push((Op::Same, i, j));
                i += 1;
                j += 1;
            } else if i < n && (j == m || lcs[i + 1][j] >= lcs[i][j + 1]) {
                // Removed lines before added ones, as diff(1) prints a change.
                ops.push((Op::Del, i, j));
                i += 1;
            } else {
                ops.push((Op::Add, i, j));
                j += 1;
            }
        }
    } else {
        ops.extend((0..a.len()).map(|i| (Op::Del, i, 0)));
        ops.extend((0..b.len()).map(|j| (Op::Add, a.len(), j)));
    }
    let mut out = String::new();
    let mut k = 0;
    while k < ops.len() {
        let Some(first) = (k..ops.len()).find(|&x| ops[x].0 != Op::Same) else {
            break;
        };
        // A hunk: changes closer than 2*context lines apart stay together.
        let start = first.saturating_sub(context);
        let mut end = first;
        let mut x = first;
        while x < ops.len() {
            if ops[x].0 != Op::Same {
                end = x;
                x += 1;
                continue;
            }
            let run = (x..ops.len()).take_while(|&y| ops[y].0 == Op::Same).count();
            if x + run < ops.len() && run <= 2 * context {
                x += run;
            } else {
                break;
            }
        }
        let stop = (end + 1 + context).min(ops.len());
        let hunk = &ops[start..stop];
        let a_start = hunk.first().map_or(0, |o| o.1);
        let b_start = hunk.first().map_or(0, |o| o.2);
        let a_len = hunk.iter().filter(|o| o.0 != Op::Add).count();
        let b_len = hunk.iter().filter(|o| o.0 != Op::Del).count();
        out += &format!("@@ -{},{a_len} +{},{b_len} @@\n", a_start + 1, b_start + 1);
        for &(op, i, j) in hunk {
            match op {
                Op::Same => out += &format!(" {}\n", a[i]),
                Op::Del => out += &format!("-{}\n", a[i]),
                Op::Add => out += &format!("+{}\n", b[j]),
            }
        }
        k = stop;
    }
    out
}

/// `dva describe NAME`: everything about one appliance an operator looks at first, in one
/// read: status and why, the layout, every unit with its host, backends, and the recent events.
pub fn describe(t: &Target, name: &str) -> anyhow::Result<()> {
    let c = client(t)?;
    let v = c.get(name)?;
    let events = c.events(name).unwrap_or_default();
    println!("Name:            {}", v.name);
    println!("Status:          {:?}", v.status);
    if let Some(e) = &v.error {
        println!("Error:           {e}");
    }
    println!("Generation:      {}", v.generation);
    println!("Config version:  {}", v.config_version);
    println!(
        "Data planes:     {} ready / {} desired (draining {}, min {}, max {})",
        v.dataplanes.ready,
        v.dataplanes.desired,
        v.dataplanes.draining,
        v.dataplanes.min,
        v.dataplanes.max
    );
    if let Ok(spec) = dva_proto::ApplianceSpec::from_yaml(&v.spec) {
        let s = &spec.spec;
        println!("Interfaces:");
        for i in &s.interfaces {
            println!("  {:<12} device {}", i.name, i.device);
        }
        println!("Services:        {} stage(s)", s.services.len());
        let r = &s.runtime;
        println!(
            "Runtime:         driver {}, backplane {}, busy poll {}, cpus {}",
            r.driver.as_str(),
            r.backplane.as_str(),
            r.busy_poll
                .filter(|d| d.0 > 0)
                .map_or("off".to_string(), String::from),
            r.cpus
                .as_ref()
                .map_or("not pinned".to_string(), |c| c.to_string())
        );
    }
    let mut hosts: Vec<&str> = v.units.iter().map(|u| u.host.as_str()).collect();
    hosts.sort_unstable();
    hosts.dedup();
    println!("Hosts:           {}", hosts.join(", "));
    println!();
    print_units(&v.units);
    if !v.backends.is_empty() {
        println!("\nBackends:");
        for b in &v.backends {
            println!(
                "  {}/{}: {} ({}/{} checks up){}",
                b.service,
                b.backend,
                b.health,
                b.up_votes,
                b.checks,
                b.error
                    .as_deref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            );
        }
    }
    println!(
        "\nEvents (latest {} of {}):",
        events.len().min(15),
        events.len()
    );
    for e in events.iter().rev().take(15).rev() {
        println!("  {:>6}  {:<15} {}", age(e.time_ms), e.reason, e.message);
    }
    Ok(())
}

/// Whether a management API is configured (flags, environment or the client file).
pub fn has_server(t: &Target) -> bool {
    t.server.is_some()
        || std::env::var_os("DVA_SERVER").is_some()
        || ClientConfig::load(&ClientConfig::default_path()).is_ok()
}

/// `dva stats NAME [-w]` through the API: each unit's counters; watching, each unit's rates over
/// the last second (two reads apart; a unit that restarted starts again from its new counters).
pub fn stats(t: &Target, name: &str, json: bool, watch: bool) -> anyhow::Result<()> {
    let c = client(t)?;
    let first = c.stats(name)?;
    if !watch {
        if json {
            println!("{}", serde_json::to_string_pretty(&first)?);
            return Ok(());
        }
        println!(
            "{:>4}  {:<10}  {:<14}  {:>12}  {:>12}  {:>8}  {:>8}  {:>8}",
            "UNIT", "ROLE", "HOST", "RX PKTS", "TX PKTS", "FLOWS", "ACTIVE", "DROPS"
        );
        for u in &first.units {
            if !u.answered {
                println!(
                    "{:>4}  {:<10}  {:<14}  (no answer: {:?})",
                    u.id,
                    format!("{:?}", u.role).to_lowercase(),
                    u.host,
                    u.state
                );
                continue;
            }
            println!(
                "{:>4}  {:<10}  {:<14}  {:>12}  {:>12}  {:>8}  {:>8}  {:>8}",
                u.id,
                format!("{:?}", u.role).to_lowercase(),
                u.host,
                u.rx_packets,
                u.tx_packets,
                u.flows,
                u.active_flows,
                u.drops
            );
        }
        return Ok(());
    }
    let stop = Arc::new(AtomicBool::new(false));
    let _ = signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone());
    let mut prev = first;
    if !json {
        println!(
            "{:>8}  {:>4}  {:<10}  {:>10}  {:>12}  {:>9}  {:>8}",
            "TIME", "UNIT", "ROLE", "RX PPS", "RX BYTES/S", "DROPS/S", "FLOWS"
        );
    }
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_secs(1));
        let now = match c.stats(name) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("dva stats: {e:#}");
                continue;
            }
        };
        let secs = (now.time_ms.saturating_sub(prev.time_ms) as f64 / 1000.0).max(0.001);
        for u in now.units.iter().filter(|u| u.answered) {
            let before = prev
                .units
                .iter()
                .find(|p| p.id == u.id && p.answered && p.uptime_secs <= u.uptime_secs);
            let rate = |now: u64, then: Option<u64>| {
                then.map_or(0.0, |t| now.saturating_sub(t) as f64 / secs)
            };
            let pps = rate(u.rx_packets, before.map(|b| b.rx_packets));
            let bps = rate(u.rx_bytes, before.map(|b| b.rx_bytes));
            let dps = rate(u.drops, before.map(|b| b.drops));
            if json {
                println!(
                    "{}",
                    serde_json::json!({"time_ms": now.time_ms, "unit": u.id, "role": u.role,
                        "rx_pps": pps, "rx_bytes_per_s": bps, "drops_per_s": dps, "flows": u.flows})
                );
            } else {
                println!(
                    "{:>8}  {:>4}  {:<10}  {:>10.0}  {:>12.0}  {:>9.0}  {:>8}",
                    (now.time_ms / 1000) % 100_000,
                    u.id,
                    format!("{:?}", u.role).to_lowercase(),
                    pps,
                    bps,
                    dps,
                    u.flows
                );
            }
        }
        prev = now;
    }
    Ok(())
}

/// `dva flows NAME`: the connection table across data planes, filtered by the server (`query`).
pub fn flows(t: &Target, name: &str, query: &str, format: Format) -> anyhow::Result<()> {
    let v = client(t)?.flows(name, query)?;
    if structured(&v, format)? {
        return Ok(());
    }
    let wide = format == Format::Wide;
    let ep = |a: std::net::IpAddr, p: u16| std::net::SocketAddr::new(a, p).to_string();
    print!(
        "{:>4}  {:<7}  {:<22}  {:<22}  {:<22}  {:>6}  {:<22}",
        "UNIT", "PROTO", "SOURCE", "DESTINATION", "STATE", "BUCKET", "NAT/BACKEND"
    );
    if wide {
        print!(
            "  {:>8}  {:>10}  {:>8}  {:>10}  {:>8}  {:>8}",
            "PKTS>", "BYTES>", "<PKTS", "<BYTES", "AGE", "IDLE"
        );
    }
    println!();
    for f in &v.flows {
        let xlat = match (&f.nat, &f.backend) {
            (Some(n), _) => format!("{} -> {}", ep(n.src, n.src_port), ep(n.dst, n.dst_port)),
            (None, Some(b)) => b.clone(),
            (None, None) => "-".into(),
        };
        let state = if f.replica {
            format!("{} (replica)", f.state)
        } else if f.previous_owner {
            format!("{} (previous)", f.state)
        } else {
            f.state.clone()
        };
        print!(
            "{:>4}  {:<7}  {:<22}  {:<22}  {:<22}  {:>6}  {:<22}",
            f.unit,
            dva_unit::inspect::proto_name(f.proto),
            ep(f.src, f.src_port),
            ep(f.dst, f.dst_port),
            state,
            f.bucket,
            xlat
        );
        if wide {
            print!(
                "  {:>8}  {:>10}  {:>8}  {:>10}  {:>7.1}s  {:>7.1}s",
                f.orig_packets,
                f.orig_bytes,
                f.reply_packets,
                f.reply_bytes,
                f.age_secs,
                f.idle_secs
            );
        }
        println!();
    }
    if v.truncated {
        eprintln!(
            "(more flows matched: the listing stops at --limit; narrow the filter or raise it)"
        );
    }
    for e in &v.errors {
        eprintln!("unit {} did not answer: {}", e.unit, e.error);
    }
    Ok(())
}

/// `dva config NAME UNIT`: the role config the unit runs, keys redacted (YAML unless `-o json`).
pub fn config(t: &Target, name: &str, unit: u32, format: Format) -> anyhow::Result<()> {
    let v = client(t)?.unit_config(name, unit)?;
    let format = match format {
        Format::Json => Format::Json,
        _ => Format::Yaml,
    };
    structured(&v, format)?;
    Ok(())
}

/// `dva capture`'s filter words as query parameters: `host ADDR`, `port N`, `proto N` and the
/// protocol names, optionally joined by `and` (the server checks the values).
pub fn capture_filter(words: &[String]) -> anyhow::Result<Vec<String>> {
    use dva_unit::inspect::percent_encode as enc;
    let mut q = Vec::new();
    let mut it = words.iter().map(String::as_str);
    while let Some(w) = it.next() {
        match w {
            "and" | "&&" => {}
            "host" | "port" | "proto" => {
                let Some(v) = it.next() else {
                    bail!("filter: `{w}` needs a value");
                };
                q.push(format!("{w}={}", enc(v)));
            }
            "tcp" | "udp" | "icmp" | "icmpv6" | "sctp" | "udplite" => q.push(format!("proto={w}")),
            other => bail!(
                "filter: {other:?} is not understood (use host ADDR, port N, proto N, tcp, udp, icmp, icmpv6, sctp, joined by `and`)"
            ),
        }
    }
    Ok(q)
}

/// `dva capture NAME ... -w FILE`: stream the pcap the server sends into `file`.
pub fn capture(
    t: &Target,
    name: &str,
    query: &str,
    duration: Duration,
    file: &Path,
) -> anyhow::Result<()> {
    use std::io::Write;
    let c = client(t)?;
    let path = format!("/v1/appliances/{name}/capture?{query}");
    // Quiet captures send nothing for their whole duration.
    let timeout = duration + Duration::from_secs(30);
    let bytes = if file == Path::new("-") {
        let mut out = std::io::stdout().lock();
        let n = c.download_from_leader(&path, &mut out, timeout)?;
        out.flush()?;
        n
    } else {
        let f =
            std::fs::File::create(file).with_context(|| format!("creating {}", file.display()))?;
        let mut out = std::io::BufWriter::new(f);
        let n = c.download_from_leader(&path, &mut out, timeout)?;
        out.flush()
            .with_context(|| format!("writing {}", file.display()))?;
        let packets = std::fs::read(file).map(|b| pcap_records(&b)).unwrap_or(0);
        eprintln!(
            "{packets} packets ({n} bytes) written to {}",
            file.display()
        );
        n
    };
    if bytes == 0 {
        bail!("the server sent no capture");
    }
    Ok(())
}

/// `dva monitor NAME ...`: print the events the server streams, a readable line each (or the
/// JSON lines as they come with `json`), until `duration` or Ctrl-C.
pub fn monitor(
    t: &Target,
    name: &str,
    query: &str,
    duration: Duration,
    json: bool,
) -> anyhow::Result<()> {
    let c = client(t)?;
    let path = format!("/v1/appliances/{name}/monitor?{query}");
    // A quiet stream sends nothing for its whole duration.
    let timeout = duration + Duration::from_secs(30);
    let mut out = EventPrinter {
        json,
        pending: Vec::new(),
    };
    c.download_from_leader(&path, &mut out, timeout)?;
    Ok(())
}

/// Turns the stream's lines into printed events as they arrive.
struct EventPrinter {
    json: bool,
    pending: Vec<u8>,
}

impl std::io::Write for EventPrinter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.pending.extend_from_slice(buf);
        let mut stdout = std::io::stdout().lock();
        while let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            if self.json {
                stdout.write_all(&line)?;
            } else {
                match serde_json::from_slice::<dva_unit::monitor::MonitorEvent>(&line) {
                    Ok(e) => writeln!(stdout, "{}", event_line(&e))?,
                    Err(_) => stdout.write_all(&line)?,
                }
            }
        }
        stdout.flush()?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().flush()
    }
}

/// One event as `dva monitor` prints it: time (UTC), unit, type, verdict or reason, rule, tuple.
fn event_line(e: &dva_unit::monitor::MonitorEvent) -> String {
    use dva_unit::monitor::{EventType, FlowEvent};
    let ms = e.ts_ms % 86_400_000;
    let time = format!(
        "{:02}:{:02}:{:02}.{:03}",
        ms / 3_600_000,
        ms / 60_000 % 60,
        ms / 1000 % 60,
        ms % 1000
    );
    let end = |a: Option<std::net::IpAddr>, p: Option<u16>| match (a, p) {
        (Some(std::net::IpAddr::V6(a)), Some(p)) => format!("[{a}]:{p}"),
        (Some(a), Some(p)) => format!("{a}:{p}"),
        (Some(a), None) => a.to_string(),
        _ => "?".into(),
    };
    let tuple = if e.src.is_some() {
        format!(
            "{} {} -> {}",
            e.proto
                .map(dva_unit::inspect::proto_name)
                .unwrap_or_default(),
            end(e.src, e.src_port),
            end(e.dst, e.dst_port)
        )
    } else {
        String::new()
    };
    let mut line = format!("{time} unit {:<3} ", e.unit);
    match e.kind {
        EventType::Lost => {
            line += &format!(
                "LOST  {} events (over the rate, or the reader too slow)",
                e.count.unwrap_or(0)
            );
            return line;
        }
        EventType::Flow => {
            let what = match e.event {
                Some(FlowEvent::New) => "new",
                Some(FlowEvent::Expired) => "expired",
                None => "?",
            };
            line += &format!("FLOW  {what:<22} ");
        }
        EventType::Drop => {
            line += &format!("DROP  {:<22} ", e.reason.as_deref().unwrap_or("?"));
        }
    }
    if let Some(r) = &e.rule {
        line += &format!("rule {r:<14} ");
    }
    line += &tuple;
    if let Some(i) = &e.interface {
        line += &format!(" in {i}");
    }
    if let Some(b) = e.bucket {
        line += &format!(" bucket {b}");
    }
    if let Some(n) = &e.nat {
        line += &format!(
            " nat {} -> {}",
            end(Some(n.src), Some(n.src_port)),
            end(Some(n.dst), Some(n.dst_port))
        );
    }
    if let Some(b) = &e.backend {
        line += &format!(" backend {b}");
    }
    if let (Some(op), Some(ob), Some(rp), Some(rb)) =
        (e.orig_packets, e.orig_bytes, e.reply_packets, e.reply_bytes)
    {
        line += &format!(" {op}p/{ob}B out, {rp}p/{rb}B back");
    }
    if let Some(d) = e.duration_secs {
        line += &format!(" {d:.1}s");
    }
    line
}

/// Records in a pcap file (the classic format `dva capture` writes).
fn pcap_records(b: &[u8]) -> u64 {
    let mut at = dva_io::capture::FILE_HEADER_LEN;
    let mut n = 0;
    while let Some(h) = b.get(at..at + dva_io::capture::RECORD_HEADER_LEN) {
        let incl = u32::from_le_bytes([h[8], h[9], h[10], h[11]]) as usize;
        at += dva_io::capture::RECORD_HEADER_LEN + incl;
        if at > b.len() {
            break;
        }
        n += 1;
    }
    n
}

#[cfg(test)]
mod diff_tests {
    use super::unified_diff;

    fn lines(s: &str) -> Vec<String> {
        s.lines().map(str::to_string).collect()
    }

    #[test]
    fn a_changed_line_shows_as_a_hunk_with_context() {
        let a = lines("a\nb\nc\nd\ne\nf\ng\nh");
        let b = lines("a\nb\nc\nD\ne\nf\ng\nh");
        let d = unified_diff(&a, &b, 1);
        assert_eq!(d, "@@ -3,3 +3,3 @@\n c\n-d\n+D\n e\n");
    }

    #[test]
    fn identical_texts_have_no_diff_and_new_texts_are_all_added() {
        let a = lines("x\ny");
        assert_eq!(unified_diff(&a, &a, 3), "");
        let d = unified_diff(&[], &a, 3);
        assert_eq!(d, "@@ -1,0 +1,2 @@\n+x\n+y\n");
    }
}

#[cfg(test)]
mod monitor_tests {
    use super::event_line;
    use dva_unit::monitor::{EventType, FlowEvent, MonitorEvent};

    #[test]
    fn events_print_as_one_readable_line() {
        let key = dva_flow::FlowKey {
            proto: 6,
            src: "198.18.1.2".parse().expect("addr"),
            dst: "198.18.2.2".parse().expect("addr"),
            src_port: 40000,
            dst_port: 8080,
        };
        let drop = MonitorEvent {
            ts_ms: 3_723_004,
            reason: Some("firewall-default-policy".into()),
            rule: Some("(default)".into()),
            interface: Some("outside".into()),
            ..MonitorEvent::new(EventType::Drop, 3, Some(&key))
        };
        let line = event_line(&drop);
        assert!(line.starts_with("01:02:03.004 unit 3 "), "{line}");
        assert!(
            line.contains("DROP  firewall-default-policy")
                && line.contains("rule (default)")
                && line.contains("tcp 198.18.1.2:40000 -> 198.18.2.2:8080 in outside"),
            "{line}"
        );
        let gone = MonitorEvent {
            event: Some(FlowEvent::Expired),
            orig_packets: Some(5),
            orig_bytes: Some(400),
            reply_packets: Some(4),
            reply_bytes: Some(900),
            duration_secs: Some(1.25),
            ..MonitorEvent::new(EventType::Flow, 4, Some(&key))
        };
        let line = event_line(&gone);
        assert!(
            line.contains("FLOW  expired") && line.contains("5p/400B out, 4p/900B back 1.2s"),
            "{line}"
        );
        assert!(event_line(&MonitorEvent::lost(2, 17)).contains("LOST  17 events"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ca_comes_from_the_flag_then_the_environment_then_the_client_file() {
        let dir = std::env::temp_dir().join(format!("dva-ctl-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (flag, env) = (dir.join("flag.pem"), dir.join("env.pem"));
        std::fs::write(&flag, "flag").unwrap();
        std::fs::write(&env, "env").unwrap();
        let file = || Some("file".to_string());
        let pick = |f: Option<&Path>, e: Option<&Path>| ca_pem(f, e, file).unwrap();
        assert_eq!(pick(Some(&flag), Some(&env)).as_deref(), Some("flag"));
        assert_eq!(pick(None, Some(&env)).as_deref(), Some("env"));
        assert_eq!(pick(None, None).as_deref(), Some("file"));
        assert_eq!(ca_pem(None, None, || None).unwrap(), None);
        // A CA named but unreadable is an error, not a silent fallback.
        let e = ca_pem(Some(&dir.join("missing.pem")), None, file).unwrap_err();
        assert!(format!("{e:#}").contains("--ca"), "{e:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tls_auto_names_every_address_a_client_dials() {
        let listen: SocketAddr = "0.0.0.0:7080".parse().unwrap();
        let names = tls_auto_names(listen, Some("198.51.100.7:7080".parse().unwrap()));
        for want in ["127.0.0.1", "::1", "localhost", "198.51.100.7"] {
            assert!(names.iter().any(|n| n == want), "{want} in {names:?}");
        }
        assert!(!names.iter().any(|n| n == "0.0.0.0"), "{names:?}");
        let names = tls_auto_names("192.0.2.1:7080".parse().unwrap(), None);
        assert!(names.iter().any(|n| n == "192.0.2.1"), "{names:?}");
        assert_eq!(
            dial_address(listen),
            "127.0.0.1:7080".parse::<SocketAddr>().unwrap()
        );
        let v6: SocketAddr = "[::]:7080".parse().unwrap();
        assert_eq!(
            dial_address(v6),
            "[::1]:7080".parse::<SocketAddr>().unwrap()
        );
        let bound: SocketAddr = "192.0.2.1:7080".parse().unwrap();
        assert_eq!(dial_address(bound), bound);
    }
}
