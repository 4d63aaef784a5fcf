//! The reconciler: every [`PERIOD`], make each appliance's units match its record.
//!
//! * one manager unit, one dispatcher per dispatcher host, `dataplanes` data planes spread over
//!   the data-plane hosts; a unit whose process died is replaced;
//! * scale-in marks the newest data planes `draining`: the manager takes their buckets away (they
//!   stay in the buckets' history and keep serving their flows, reached by punting) and they are
//!   stopped once they hold no open flow, or when the drain deadline passes;
//! * the desired state (spec + units) goes to the manager over a long-lived channel; the manager's
//!   status (ACKs, NACKs, per-unit reports) comes back on it and feeds `get`.
//!
//! The store is written before anything is started, so a restart finds every unit it started.

use std::collections::BTreeMap;
use std::io::{BufReader, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dva_flow::BucketTable;
use dva_lab::Lab;
use dva_proto::channel::{
    self, Desired, DesiredRole, DesiredUnit, FromManager, ManagerStatus, ToManager, UnitStatus,
};
use dva_proto::{compile, ApplianceSpec, Placement, UnitEndpoint};
use dva_unit::tls::{self, TlsWriter};

use crate::autoscale::Autoscaler;
use crate::core::{push_event, Appliance, Inner};
use crate::model::*;
use crate::provision::{UnitLaunch, UnitProcess};

const PERIOD: Duration = Duration::from_millis(200);
/// GENEVE's IANA port; further units on one host take the next ports.
const BACKPLANE_PORT: u16 = 6081;
/// The first port an appliance's managers may listen on; each appliance of this management
/// tool gets its own, kept in its record.
const MANAGER_PORT: u16 = 7443;
/// How long the link to a manager may take to connect and finish its TLS handshake (the
/// reconciler waits for it).
const LINK_TIMEOUT: Duration = Duration::from_secs(2);
/// A draining data plane must look empty this long before it is stopped (reports are 4 Hz).
const DRAIN_CLEAR_FOR: Duration = Duration::from_millis(1000);
/// Desired state is re-sent this often even when unchanged (a restarted manager needs it).
const DESIRED_EVERY: Duration = Duration::from_millis(1000);
/// A data plane exporting its state is stopped after this long whatever it still holds.
const EXPORT_LIMIT_MS: u64 = 5_000;

/// What the reconciler knows at run time about one appliance (never stored).
#[derive(Default)]
pub struct Runtime {
    link: Option<ManagerLink>,
    desired_sent: Option<(Instant, Desired)>,
    /// Why the appliance cannot be reconciled right now (no lab, a unit that fails to start).
    error: Option<String>,
    drain_clear: BTreeMap<u32, Instant>,
    units_json: String,
    pub(crate) autoscaler: Autoscaler,
    /// Dispatcher hosts the upstream routes point at.
    ecmp: Vec<usize>,
}

struct ManagerLink {
    writer: TlsWriter,
    status: Arc<Mutex<Option<ManagerStatus>>>,
    alive: Arc<AtomicBool>,
}

impl ManagerLink {
    /// Connect to the manager listening at `addr` (from inside network namespace `netns`, where
    /// the manager's host is: a socket keeps the namespace it was made in).
    fn connect(
        inner: &Inner,
        appliance: &str,
        addr: SocketAddr,
        netns: Option<&str>,
    ) -> std::io::Result<ManagerLink> {
        let config = inner.link_tls.clone();
        let name = tls::manager_server_name(appliance);
        let open = move || tls::connect(addr, config, &name, LINK_TIMEOUT);
        let (reader, writer) = match netns {
            Some(ns) => dva_io::netns::in_netns(ns, open).map_err(std::io::Error::other)??,
            None => open()?,
        };
        writer.set_write_timeout(Some(Duration::from_secs(2)))?;
        let status = Arc::new(Mutex::new(None));
        let alive = Arc::new(AtomicBool::new(true));
        {
            let (status, alive) = (status.clone(), alive.clone());
            std::thread::Builder::new()
                .name("manager-link".into())
                .spawn(move || {
                    let mut r = BufReader::new(reader);
                    while let Ok(Some(msg)) = channel::recv::<_, FromManager>(&mut r) {
                        if let FromManager::Status(s) = msg {
                            if let Ok(mut g) = status.lock() {
                                *g = Some(*s);
                            }
                        }
                    }
                    alive.store(false, Ordering::Release);
                })?;
        }
        Ok(ManagerLink {
            writer,
            status,
            alive,
        })
    }

    fn status(&self) -> Option<ManagerStatus> {
        self.status.lock().ok().and_then(|g| g.clone())
    }
}

/// How often the lab's shape is read again (it runs `ip netns list`).
const LAB_EVERY: Duration = Duration::from_secs(2);

/// A host units can be placed on: its name (a lab host's network namespace, or this machine's
/// host name) and the address its units' backplane sockets bind.
#[derive(Debug, Clone)]
struct Host {
    name: String,
    backplane: IpAddr,
    /// The network namespace its units run in, as seen from `dva serve` (a lab host); `None`:
    /// ours, or another machine's (an agent's host, reached over the network).
    netns: Option<String>,
    /// Its CPUs (agents' hosts; 1 elsewhere): data planes go where fewest run per CPU.
    cpus: u32,
    /// The appliance of each unit its agent last reported (agents' hosts): other appliances'
    /// units take capacity too.
    running: Vec<String>,
}

/// Where units may go: the hosts of registered agents, the lab's hosts, or this machine alone.
struct Hosts {
    dispatchers: Vec<Host>,
    dataplanes: Vec<Host>,
    /// Every host a manager may be on (including agents' hosts not ready right now, where a
    /// manager may still run): where its channel address is looked up, and what units are told.
    managers: Vec<Host>,
    /// The lab, for what only a lab has (upstream ECMP routers).
    lab: Option<Lab>,
    /// Units are placed on agents' hosts.
    agents: bool,
}

impl Hosts {
    fn lab(lab: Lab) -> Hosts {
        let dispatchers = (1..=lab.dispatchers.max(1))
            .map(|d| Host {
                name: lab.dispatcher_ns(d),
                backplane: IpAddr::V4(Lab::dispatcher_backplane_addr(d)),
                netns: Some(lab.dispatcher_ns(d)),
                cpus: 1,
                running: Vec::new(),
            })
            .collect();
        let dataplanes: Vec<Host> = (1..=lab.hosts.max(1))
            .map(|m| Host {
                name: lab.host_ns(m),
                backplane: IpAddr::V4(Lab::host_backplane_addr(m)),
                netns: Some(lab.host_ns(m)),
                cpus: 1,
                running: Vec::new(),
            })
            .collect();
        Hosts {
            dispatchers,
            managers: dataplanes.clone(),
            dataplanes,
            lab: Some(lab),
            agents: false,
        }
    }

    /// The hosts of registered agents: dispatchers on those labelled `dispatcher=true`, data
    /// planes and managers on the others (on all when every host is labelled). Only ready hosts
    /// take new units; a lost one is left out of everything.
    fn agents(registry: &crate::hosts::Registry) -> Hosts {
        use crate::hosts::HostState;
        let all = registry.placeable();
        let host = |p: &crate::hosts::Placeable| Host {
            name: p.record.name.clone(),
            backplane: p.record.backplane,
            netns: None,
            cpus: p.record.cpus.max(1),
            running: p.appliances.clone(),
        };
        let unlabelled = all.iter().any(|p| !p.record.is_dispatcher());
        let dp_kind = |p: &crate::hosts::Placeable| !unlabelled || !p.record.is_dispatcher();
        Hosts {
            dispatchers: all
                .iter()
                .filter(|p| p.state == HostState::Ready && p.record.is_dispatcher())
                .map(host)
                .collect(),
            dataplanes: all
                .iter()
                .filter(|p| p.state == HostState::Ready && dp_kind(p))
                .map(host)
                .collect(),
            managers: all.iter().filter(|p| dp_kind(p)).map(host).collect(),
            lab: None,
            agents: true,
        }
    }

    /// The network namespace `dva serve` reaches units of `host` from.
    fn netns_of(&self, host: &str) -> Option<&str> {
        self.managers
            .iter()
            .chain(&self.dispatchers)
            .find(|h| h.name == host)
            .and_then(|h| h.netns.as_deref())
    }

    /// This machine: units in our own network namespace (where the spec's devices are), the
    /// backplane on loopback (dispatchers and data planes exchange packets through rings; data
    /// planes reach each other over UDP on loopback).
    fn local() -> Hosts {
        let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".to_string());
        let host = Host {
            name,
            backplane: IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            netns: None,
            cpus: 1,
            running: Vec::new(),
        };
        Hosts {
            dispatchers: vec![host.clone()],
            managers: vec![host.clone()],
            dataplanes: vec![host],
            lab: None,
            agents: false,
        }
    }

    fn describe(&self) -> String {
        match &self.lab {
            Some(lab) => format!("lab {}", lab.prefix),
            None if self.agents => "the registered hosts".to_string(),
            None => "this machine".to_string(),
        }
    }
}

pub(crate) fn run(inner: &Inner) {
    let mut hosts: Option<Hosts> = None;
    let mut hosts_at: Option<Instant> = None;
    // The term this replica reconciles for (etcd store); a new one means a fresh takeover.
    let mut led: Option<i64> = None;
    // Orphans asked to stop, and when (asked again after a while if still running).
    let mut fenced: BTreeMap<(String, u32), Instant> = BTreeMap::new();
    while !inner.stop.load(Ordering::Acquire) {
        if let Some(l) = &inner.leadership {
            let term = l.term();
            if term != led {
                match term {
                    Some(t) => {
                        if !take_over(inner, t) {
                            // Not taken over yet: the next turn tries again.
                            std::thread::sleep(PERIOD);
                            continue;
                        }
                    }
                    None => tracing::info!(
                        "leadership: this replica does not lead; its reconciler is paused"
                    ),
                }
                led = term;
            }
            if term.is_none() {
                std::thread::sleep(PERIOD);
                continue;
            }
        }
        if !inner.registry.is_empty() {
            // Agents' hosts change state every poll: read them every pass (no I/O).
            hosts = Some(Hosts::agents(&inner.registry));
            hosts_at = None;
        } else if hosts.is_none() || hosts_at.is_none_or(|t| t.elapsed() >= LAB_EVERY) {
            hosts = if inner.opts.local {
                Some(Hosts::local())
            } else {
                Lab::discover(&inner.opts.lab_prefix)
                    .ok()
                    .flatten()
                    .map(Hosts::lab)
            };
            hosts_at = Some(Instant::now());
        }
        let names: Vec<String> = inner.lock().keys().cloned().collect();
        for name in names {
            // Fencing: a leader whose lease may have run out stops at once, mid-pass.
            if inner.leadership.as_ref().is_some_and(|l| l.term() != led) {
                break;
            }
            let mut all = inner.lock();
            let ports: Vec<u16> = all.values().filter_map(|a| a.rec.manager_port).collect();
            let Some(app) = all.get_mut(&name) else {
                continue;
            };
            if app.deleting {
                continue;
            }
            reconcile(inner, app, hosts.as_ref(), &ports);
        }
        if !inner.registry.is_empty() {
            fence_orphans(inner, &mut fenced);
        }
        inner.reconcile_passes.fetch_add(1, Ordering::Relaxed);
        inner.notify();
        inner.last_pass_ms.store(now_ms(), Ordering::Relaxed);
        std::thread::sleep(PERIOD);
    }
}

pub(crate) fn run_dir(inner: &Inner, name: &str) -> PathBuf {
    inner
        .opts
        .run_root
        .join(format!("{}{}", inner.opts.lab_prefix, name))
}

pub(crate) fn launch(inner: &Inner, name: &str, u: &UnitRecord) -> UnitLaunch {
    let dir = run_dir(inner, name);
    UnitLaunch {
        appliance: name.to_string(),
        id: u.id,
        role: u.role,
        host: u.host.clone(),
        netns: (!inner.opts.local).then(|| u.host.clone()),
        managers: String::new(),
        listen: None,
        tls_dir: dir.join(format!("unit-{}", u.id)),
        credentials: None,
        control: control_socket(inner, name, u.id),
        log: dir.join(format!("unit-{}.log", u.id)),
    }
}

/// A unit's control socket (what `units.json` lists and `/metrics` reads).
pub(crate) fn control_socket(inner: &Inner, name: &str, id: u32) -> PathBuf {
    run_dir(inner, name).join(format!("unit-{id}.sock"))
}

/// Reject at apply time what the manager could not compile (e.g. a route via no interface).
pub(crate) fn check_compiles(spec: &ApplianceSpec) -> Result<(), String> {
    let ep = |id, port| UnitEndpoint {
        id,
        addr: SocketAddr::new(IpAddr::from([198, 19, 0, 1]), port),
    };
    let table = BucketTable::maglev(spec.spec.layout.buckets, &[2])
        .map_err(|e| format!("spec.layout.buckets: {e}"))?;
    let placement = Placement {
        dispatchers: vec![ep(1, BACKPLANE_PORT)],
        dataplanes: vec![ep(2, BACKPLANE_PORT + 1)],
        table,
    };
    compile(spec, &placement, 1)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// A port for an appliance's managers: not another appliance's, and (on this machine, where
/// every manager shares loopback) free right now.
fn pick_manager_port(taken: &[u16], local: bool) -> Option<u16> {
    (MANAGER_PORT..MANAGER_PORT.saturating_add(1000)).find(|p| {
        !taken.contains(p)
            && (!local || std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, *p)).is_ok())
    })
}

/// Where a manager on `host` listens.
fn manager_addr(hosts: &Hosts, host: &str, port: u16) -> Option<SocketAddr> {
    hosts
        .managers
        .iter()
        .find(|h| h.name == host)
        .map(|h| SocketAddr::new(h.backplane, port))
}

/// Every address a manager may lead from (managers go on data-plane hosts): what units are told.
fn manager_endpoints(hosts: &Hosts, port: u16) -> String {
    let mut v: Vec<String> = Vec::new();
    for h in &hosts.managers {
        let e = format!("tcp://{}", SocketAddr::new(h.backplane, port));
        if !v.contains(&e) {
            v.push(e);
        }
    }
    v.join(",")
}

fn reconcile(inner: &Inner, app: &mut Appliance, hosts: Option<&Hosts>, ports: &[u16]) {
    let Some(hosts) = hosts else {
        app.rt.error = Some(format!(
            "no lab with prefix {:?} (create it with `dva lab up --prefix {}`, or run `dva \
             agent` on the machines units may use)",
            inner.opts.lab_prefix, inner.opts.lab_prefix
        ));
        return;
    };
    let before = app.rec.clone();
    let name = app.rec.name.clone();
    let status = app.rt.link.as_ref().and_then(|l| l.status());
    let now = now_ms();

    // 1. Units whose process is gone.
    let mut kept = Vec::new();
    for mut u in std::mem::take(&mut app.rec.units) {
        let alive = process(&u)
            .is_some_and(|p| inner.provisioner.alive(p, &launch(inner, &name, &u)))
            || adopt_unit(inner, &name, &mut u, &mut app.rec);
        if alive {
            kept.push(u);
            continue;
        }
        if u.state == UnitState::Stopped {
            push_event(
                &mut app.rec,
                "unit-stopped",
                format!("{} unit {} on {} exited", u.role.as_str(), u.id, u.host),
            );
        } else if inner.registry.state(&u.host) == Some(crate::hosts::HostState::Lost) {
            push_event(
                &mut app.rec,
                "unit-died",
                format!(
                    "{} unit {} on {}: the host is lost (its agent has not answered for {} ms); \
                     replacing it on another host",
                    u.role.as_str(),
                    u.id,
                    u.host,
                    inner.opts.host_lost_after.as_millis()
                ),
            );
        } else {
            push_event(
                &mut app.rec,
                "unit-died",
                format!(
                    "{} unit {} on {} (pid {}) died; replacing it",
                    u.role.as_str(),
                    u.id,
                    u.host,
                    u.pid.unwrap_or(0)
                ),
            );
        }
        app.rt.drain_clear.remove(&u.id);
    }
    app.rec.units = kept;
    if hosts.dataplanes.is_empty() {
        // Agents' hosts, none ready yet (or all lost): nothing can be placed.
        app.rt.error = Some(
            "no ready host for data planes and managers (is `dva agent` running on them?)".into(),
        );
        if app.rec != before {
            if let Err(e) = inner.store.save(&app.rec) {
                app.rt.error = Some(format!("store: {e:#}"));
            }
        }
        return;
    }
    if app
        .rt
        .error
        .as_deref()
        .is_some_and(|e| e.starts_with("no ready host"))
    {
        app.rt.error = None;
    }

    // 2. The layout: one manager, one dispatcher per dispatcher host, N data planes.
    let mut to_start = Vec::new();
    let managers = app
        .rec
        .units
        .iter()
        .filter(|u| u.role == UnitRole::Manager)
        .count();
    for k in managers..app.spec.spec.layout.managers as usize {
        // Spread managers over the hosts, so one host's loss leaves a standby.
        let host = &hosts.dataplanes[k % hosts.dataplanes.len()];
        to_start.push((UnitRole::Manager, host.name.clone(), None));
    }
    let want_disp = app.spec.spec.layout.dispatchers as usize;
    let have_disp = hosts.dispatchers.len();
    if want_disp <= have_disp
        && app
            .rt
            .error
            .as_deref()
            .is_some_and(|e| e.starts_with("spec.layout.dispatchers"))
    {
        app.rt.error = None;
    }
    if want_disp > have_disp {
        app.rt.error = Some(match &hosts.lab {
            Some(lab) => format!(
                "spec.layout.dispatchers is {want_disp} but lab {} has {have_disp} dispatcher \
                 host(s) (`dva lab up --dispatchers {want_disp}`)",
                lab.prefix
            ),
            None if hosts.agents => format!(
                "spec.layout.dispatchers is {want_disp} but {have_disp} ready host(s) are \
                 labelled dispatcher=true (`dva agent --label dispatcher=true` on the machines \
                 that hold the interfaces)"
            ),
            None => format!(
                "spec.layout.dispatchers is {want_disp} but {} holds the interfaces of one \
                 dispatcher",
                hosts.describe()
            ),
        });
    }
    // Addresses of the units about to start: on one machine dispatchers and data planes share
    // the backplane address, so a data plane's port must avoid theirs.
    let mut planned: Vec<(String, SocketAddr)> = Vec::new();
    for host in hosts.dispatchers.iter().take(want_disp) {
        if !app
            .rec
            .units
            .iter()
            .any(|u| u.role == UnitRole::Dispatcher && u.host == host.name)
        {
            let addr = SocketAddr::new(host.backplane, BACKPLANE_PORT);
            planned.push((host.name.clone(), addr));
            to_start.push((UnitRole::Dispatcher, host.name.clone(), Some(addr)));
        }
    }
    let active: Vec<u32> = app
        .rec
        .units
        .iter()
        .filter(|u| {
            u.role == UnitRole::Dataplane
                && u.state != UnitState::Draining
                && u.state != UnitState::Stopped
        })
        .map(|u| u.id)
        .collect();
    let want = app.rec.dataplanes as usize;
    if active.len() < want {
        for _ in active.len()..want {
            let (host, addr) = place_dataplane(hosts, &name, &app.rec.units, &planned);
            planned.push((host.clone(), addr));
            to_start.push((UnitRole::Dataplane, host, Some(addr)));
        }
    } else if active.len() > want {
        // Newest first: the longest-lived data planes hold the most flows.
        let mut ids = active.clone();
        ids.sort_unstable_by(|a, b| b.cmp(a));
        for id in ids.into_iter().take(active.len() - want) {
            if let Some(u) = app.rec.units.iter_mut().find(|u| u.id == id) {
                u.state = UnitState::Draining;
                u.draining_since_ms = Some(now);
            }
            let msg = format!(
                "data plane {id} draining: no new flows, existing ones served (deadline {} ms)",
                app.rec.drain_deadline_ms
            );
            push_event(&mut app.rec, "unit-draining", msg);
        }
    }
    if !to_start.is_empty() && app.rec.manager_port.is_none() {
        match pick_manager_port(ports, inner.opts.local && !hosts.agents) {
            Some(p) => app.rec.manager_port = Some(p),
            None => {
                app.rt.error = Some(format!(
                    "no free port for the manager channel from {MANAGER_PORT}"
                ));
                return;
            }
        }
    }
    let port = app.rec.manager_port.unwrap_or(MANAGER_PORT);
    if !to_start.is_empty() {
        // Store the units before starting them, so a crash in between leaves a record to reconcile.
        let mut new_units = Vec::new();
        for (role, host, addr) in to_start {
            let id = app.rec.next_unit_id;
            app.rec.next_unit_id += 1;
            new_units.push(UnitRecord {
                id,
                role,
                host,
                pid: None,
                pid_start: None,
                addr,
                state: UnitState::Starting,
                started_ms: now,
                draining_since_ms: None,
                exporting_since_ms: None,
            });
        }
        app.rec.units.extend(new_units.iter().cloned());
        if let Err(e) = inner.store.save(&app.rec) {
            app.rt.error = Some(format!("store: {e:#}"));
            return;
        }
        for nu in new_units {
            let mut l = launch(inner, &name, &nu);
            l.managers = manager_endpoints(hosts, port);
            if nu.role == UnitRole::Manager {
                l.listen = manager_addr(hosts, &nu.host, port).map(|a| format!("tcp://{a}"));
            }
            let started = inner
                .pki
                .issue_unit(&name, nu.id, nu.role == UnitRole::Manager)
                .and_then(|issued| {
                    l.credentials = Some(issued);
                    inner.provisioner.start(&l)
                });
            match started {
                Ok(p) => {
                    let pid = p.pid;
                    if let Some(u) = app.rec.units.iter_mut().find(|u| u.id == nu.id) {
                        u.pid = Some(pid);
                        u.pid_start = p.start;
                    }
                    push_event(
                        &mut app.rec,
                        "unit-started",
                        format!(
                            "{} unit {} on {} (pid {pid})",
                            nu.role.as_str(),
                            nu.id,
                            nu.host
                        ),
                    );
                }
                Err(e) => {
                    app.rec.units.retain(|u| u.id != nu.id);
                    let msg = format!("{e:#}");
                    push_event(&mut app.rec, "unit-failed", msg.clone());
                    app.rt.error = Some(msg);
                }
            }
        }
    }

    // 3. The manager link, and the desired state over it.
    if app
        .rt
        .link
        .as_ref()
        .is_some_and(|l| !l.alive.load(Ordering::Acquire))
    {
        app.rt.link = None;
        app.rt.desired_sent = None;
    }
    if app.rt.link.is_none() {
        // The leader is one of the managers; standbys do not listen.
        let managers = app
            .rec
            .units
            .iter()
            .filter(|u| u.role == UnitRole::Manager && u.state != UnitState::Stopped);
        for u in managers {
            let Some(addr) = manager_addr(hosts, &u.host, port) else {
                continue;
            };
            let netns = hosts.netns_of(&u.host);
            if let Ok(link) = ManagerLink::connect(inner, &name, addr, netns) {
                app.rt.link = Some(link);
                break;
            }
        }
    }
    let desired = Desired {
        generation: app.rec.generation,
        spec: app.spec.clone(),
        units: app
            .rec
            .units
            .iter()
            .filter(|u| u.role != UnitRole::Manager && u.state != UnitState::Stopped)
            .filter_map(|u| {
                Some(DesiredUnit {
                    id: u.id,
                    role: match u.role {
                        UnitRole::Dispatcher => DesiredRole::Dispatcher,
                        _ => DesiredRole::Dataplane,
                    },
                    addr: u.addr?,
                    draining: u.state == UnitState::Draining,
                    export: u.state == UnitState::Draining && u.exporting_since_ms.is_some(),
                    host: Some(u.host.clone()),
                })
            })
            .collect(),
    };
    if let Some(link) = app.rt.link.as_mut() {
        let due = app
            .rt
            .desired_sent
            .as_ref()
            .is_none_or(|(at, d)| *d != desired || at.elapsed() >= DESIRED_EVERY);
        if due {
            let msg = ToManager::Desired(Box::new(desired.clone()));
            if channel::send(&mut link.writer, &msg).is_ok() {
                app.rt.desired_sent = Some((Instant::now(), desired));
            } else {
                app.rt.link = None;
            }
        }
    }

    // 4. Unit states from the manager's status; draining data planes that are done get stopped.
    if let Some(st) = &status {
        let by_id: BTreeMap<u32, &UnitStatus> = st.units.iter().map(|u| (u.id, u)).collect();
        let mut events = Vec::new();
        for u in app.rec.units.iter_mut() {
            let us = by_id.get(&u.id);
            match u.state {
                UnitState::Starting if us.is_some_and(|s| s.connected && s.acked > 0) => {
                    u.state = UnitState::Ready;
                    events.push((
                        "unit-ready",
                        format!(
                            "{} unit {} on {} serving config version {}",
                            u.role.as_str(),
                            u.id,
                            u.host,
                            us.map_or(0, |s| s.acked)
                        ),
                    ));
                }
                UnitState::Draining => {
                    let since = u.draining_since_ms.unwrap_or(now);
                    let empty = us.is_some_and(|s| {
                        s.buckets == 0
                            && st.converged
                            && s.report
                                .as_ref()
                                .is_some_and(|r| r.version >= st.version && r.active_flows == 0)
                    });
                    let clear_since = if empty {
                        *app.rt.drain_clear.entry(u.id).or_insert_with(Instant::now)
                    } else {
                        app.rt.drain_clear.remove(&u.id);
                        Instant::now()
                    };
                    let past_deadline = now.saturating_sub(since) >= app.rec.drain_deadline_ms;
                    let open = us
                        .and_then(|s| s.report.as_ref())
                        .map_or(0, |r| r.active_flows);
                    if past_deadline && u.exporting_since_ms.is_none() && !empty {
                        // Past the deadline: hand the remaining flows to their buckets' owners
                        // instead of cutting them (the unit stops once it holds none).
                        u.exporting_since_ms = Some(now);
                        events.push((
                            "unit-exporting",
                            format!(
                                "data plane {} passed its drain deadline with {open} open flow(s); \
                                 exporting their state to the buckets' owners",
                                u.id
                            ),
                        ));
                        continue;
                    }
                    let export_overdue = u
                        .exporting_since_ms
                        .is_some_and(|t| now.saturating_sub(t) >= EXPORT_LIMIT_MS);
                    // Once exporting, the unit holds no flows within milliseconds: no need to
                    // watch it stay empty for long.
                    let clear_for = if u.exporting_since_ms.is_some() {
                        Duration::from_millis(300)
                    } else {
                        DRAIN_CLEAR_FOR
                    };
                    // An exporting unit that holds no connection at all is done (draining units
                    // create none, so a zero here is final).
                    let exported = u.exporting_since_ms.is_some()
                        && us.is_some_and(|s| s.report.as_ref().is_some_and(|r| r.flows == 0));
                    let held = us.and_then(|s| s.report.as_ref()).map_or(0, |r| r.flows);
                    if empty
                        && clear_since.elapsed() >= clear_for
                        && held > 0
                        && u.exporting_since_ms.is_none()
                    {
                        // Nothing in use here any more, but state is still held (closing
                        // connections, quiet ones, ones whose packets the owner already serves):
                        // hand it over rather than drop it.
                        u.exporting_since_ms = Some(now);
                        events.push((
                            "unit-exporting",
                            format!(
                                "data plane {} is idle and holds {held} connection(s); exporting their state to the buckets' owners",
                                u.id
                            ),
                        ));
                        continue;
                    }
                    if (empty && clear_since.elapsed() >= clear_for) || exported || export_overdue {
                        let flows = open;
                        if let Some(p) = process(u) {
                            inner.provisioner.stop(p, &launch(inner, &name, u));
                        }
                        u.state = UnitState::Stopped;
                        events.push((
                            "unit-drained",
                            if exported || (empty && u.exporting_since_ms.is_some()) {
                                let ms = now.saturating_sub(since);
                                format!(
                                    "data plane {} exported its flows; stopping it ({ms} ms after it started draining)",
                                    u.id
                                )
                            } else if empty {
                                format!("data plane {} holds no open flows; stopping it", u.id)
                            } else {
                                format!(
                                    "data plane {} passed its drain deadline with {flows} open flow(s); stopping it",
                                    u.id
                                )
                            },
                        ));
                    }
                }
                _ => {}
            }
        }
        for (reason, msg) in events {
            push_event(&mut app.rec, reason, msg);
        }
    }
    // 5. The autoscaler, on the serving data planes' reports.
    if let (Some(policy), Some(st)) = (&app.spec.spec.layout.autoscale, &status) {
        let by_id: BTreeMap<u32, &UnitStatus> = st.units.iter().map(|u| (u.id, u)).collect();
        let dps: Vec<(u32, u64, f64, u64)> = app
            .rec
            .units
            .iter()
            .filter(|u| u.role == UnitRole::Dataplane && u.state == UnitState::Ready)
            .filter_map(|u| {
                let r = by_id.get(&u.id)?.report.as_ref()?;
                Some((u.id, r.rx_packets, r.cpu_percent, r.active_flows))
            })
            .collect();
        let load = app.rt.autoscaler.observe(now, &dps);
        let l = &app.spec.spec.layout.dataplanes;
        let settled = app
            .rec
            .units
            .iter()
            .filter(|u| u.role == UnitRole::Dataplane && u.state == UnitState::Ready)
            .count() as u32
            == app.rec.dataplanes;
        if settled {
            if let Some(d) =
                app.rt
                    .autoscaler
                    .decide(now, policy, &load, app.rec.dataplanes, l.min, l.max)
            {
                app.rec.dataplanes = d.target;
                app.rec.generation += 1;
                push_event(&mut app.rec, "autoscale", d.reason);
            }
        }
    }
    // A manager is ready (leading or standing by) once its control socket says so.
    for u in app.rec.units.iter_mut() {
        if u.role == UnitRole::Manager && u.state == UnitState::Starting {
            let l = launch(inner, &name, u);
            if let Ok((200, _)) =
                inner
                    .provisioner
                    .control_get(&l, "/ready", Duration::from_millis(300))
            {
                u.state = UnitState::Ready;
            }
        }
    }
    if app
        .rt
        .error
        .as_deref()
        .is_some_and(|e| e.starts_with("no lab"))
    {
        app.rt.error = None;
    }
    // Upstream ECMP over the dispatchers that serve: a dead one is withdrawn at once, its
    // replacement put back once ready (labs with several dispatcher hosts).
    if let Some(lab) = hosts.lab.as_ref().filter(|l| l.dispatchers > 1) {
        let serving: Vec<usize> = (1..=lab.dispatchers)
            .filter(|&d| {
                app.rec.units.iter().any(|u| {
                    u.role == UnitRole::Dispatcher
                        && u.state == UnitState::Ready
                        && u.host == lab.dispatcher_ns(d)
                })
            })
            .collect();
        if !serving.is_empty() && serving != app.rt.ecmp {
            match lab.set_ecmp(&serving) {
                Ok(()) => {
                    let msg = format!(
                        "upstream routes now spread flows over dispatcher host(s) {serving:?}"
                    );
                    push_event(&mut app.rec, "routes", msg);
                    app.rt.ecmp = serving;
                }
                Err(e) => app.rt.error = Some(format!("updating upstream routes: {e}")),
            }
        }
    }

    if app.rec != before {
        if let Err(e) = inner.store.save(&app.rec) {
            app.rt.error = Some(format!("store: {e:#}"));
        }
    }
    write_units_json(inner, app, hosts);
}

/// Units an agent runs that no record names any more (on that host, with that pid): those of a
/// host that was lost and came back (they were replaced elsewhere), or of a deleted appliance.
/// They are stopped, so a bucket never has two serving owners; a record still without a pid (a
/// crash between start and save) is left to adoption.
fn fence_orphans(inner: &Inner, fenced: &mut BTreeMap<(String, u32), Instant>) {
    const AGAIN: Duration = Duration::from_secs(5);
    let reported = inner.registry.reported_units();
    let orphans: Vec<(String, crate::agent::AgentUnit)> = {
        let all = inner.lock();
        reported
            .into_iter()
            .filter(|(host, au)| {
                // An appliance no record names was deleted (records are loaded before any pass).
                let Some(app) = all.get(&au.appliance) else {
                    return true;
                };
                !app.rec
                    .units
                    .iter()
                    .any(|u| u.id == au.id && u.host == *host && u.pid.is_none_or(|p| p == au.pid))
            })
            .collect()
    };
    fenced.retain(|_, t| t.elapsed() < AGAIN);
    for (host, au) in orphans {
        if fenced.contains_key(&(host.clone(), au.pid)) {
            continue;
        }
        fenced.insert((host.clone(), au.pid), Instant::now());
        let rec = UnitRecord {
            id: au.id,
            role: au.role,
            host: host.clone(),
            pid: Some(au.pid),
            pid_start: au.start,
            addr: None,
            state: UnitState::Stopped,
            started_ms: au.started_ms,
            draining_since_ms: None,
            exporting_since_ms: None,
        };
        let l = launch(inner, &au.appliance, &rec);
        inner.provisioner.stop(
            UnitProcess {
                pid: au.pid,
                start: au.start,
            },
            &l,
        );
        let msg = format!(
            "{} unit {} on {} (pid {}) is no longer the appliance's (its host was lost, the unit \
             replaced): stopping it",
            au.role.as_str(),
            au.id,
            host,
            au.pid
        );
        let mut all = inner.lock();
        match all.get_mut(&au.appliance) {
            Some(app) => {
                push_event(&mut app.rec, "unit-fenced", msg);
                if let Err(e) = inner.store.save(&app.rec) {
                    app.rt.error = Some(format!("store: {e:#}"));
                }
            }
            None => tracing::warn!(appliance = %au.appliance, "{msg}"),
        }
    }
}

/// The recorded process of a unit, if a pid was recorded.
fn process(u: &UnitRecord) -> Option<UnitProcess> {
    u.pid.map(|pid| UnitProcess {
        pid,
        start: u.pid_start,
    })
}

/// A unit whose recorded process is gone, or was never recorded (a crash of the management tool
/// between starting the unit and saving its pid): if a process runs its command line, it is the
/// unit, so take it over rather than start a second one. Duplicates (left by such crashes before
/// units were found again) are stopped, the oldest kept. Returns whether a process was adopted.
fn adopt_unit(inner: &Inner, name: &str, u: &mut UnitRecord, rec: &mut ApplianceRecord) -> bool {
    let l = launch(inner, name, u);
    let found = inner.provisioner.find(&l);
    let Some(&first) = found.first() else {
        return false;
    };
    let mut rec_events = Vec::new();
    for &dup in &found[1..] {
        inner.provisioner.stop(dup, &l);
        rec_events.push((
            "unit-duplicate",
            format!(
                "{} unit {} on {}: a second process (pid {}) runs it; stopping that one",
                u.role.as_str(),
                u.id,
                u.host,
                dup.pid
            ),
        ));
    }
    if u.pid != Some(first.pid) {
        rec_events.push((
            "unit-adopted",
            format!(
                "{} unit {} on {} found running (pid {}); adopted",
                u.role.as_str(),
                u.id,
                u.host,
                first.pid
            ),
        ));
    }
    u.pid = Some(first.pid);
    u.pid_start = first.start;
    for (reason, message) in rec_events {
        push_event(rec, reason, message);
    }
    true
}

/// This replica now leads (term `term`): what it held is stale (another leader may have changed
/// everything), so it loads every record from the store, adopts the units the last leader
/// started (they outlive it), records the takeover in each appliance's events, and reconciles
/// from there.
fn take_over(inner: &Inner, term: i64) -> bool {
    // Hosts first: a pass that found no registered host would take the agents' units for
    // units of this machine, find them dead here and start them again.
    match inner.store.load_hosts() {
        Ok(h) => inner.registry.set(h),
        Err(e) => {
            tracing::warn!(term, "leadership: loading the hosts failed: {e:#}");
            return false;
        }
    }
    let (appliances, broken) = match crate::core::load(inner.store.as_ref()) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(term, "leadership: loading the records failed: {e:#}");
            return false;
        }
    };
    {
        let mut all = inner.lock();
        *all = appliances;
        *inner.broken() = broken;
    }
    adopt_all(inner);
    let mut all = inner.lock();
    let pid = std::process::id();
    for app in all.values_mut() {
        let units = app.rec.units.iter().filter(|u| u.pid.is_some()).count();
        let msg = format!(
            "dva serve (pid {pid}) leads now (term {term}): records loaded, {units} unit(s) adopted"
        );
        crate::core::push_event(&mut app.rec, "leader-elected", msg);
        if let Err(e) = inner.store.save(&app.rec) {
            app.rt.error = Some(format!("store: {e:#}"));
        }
    }
    tracing::info!(term, appliances = all.len(), "leadership: took over");
    true
}

/// After a restart of the management tool: find every stored unit's process again (recording
/// the start time of those stored without one), so none is taken for dead and started twice.
pub(crate) fn adopt_all(inner: &Inner) {
    let mut all = inner.lock();
    for app in all.values_mut() {
        let before = app.rec.clone();
        let name = app.rec.name.clone();
        let mut units = std::mem::take(&mut app.rec.units);
        for u in units.iter_mut() {
            let l = launch(inner, &name, u);
            match process(u).filter(|&p| inner.provisioner.alive(p, &l)) {
                Some(p) if p.start.is_some() => {}
                Some(p) => u.pid_start = crate::provision::start_time(p.pid),
                None => {
                    adopt_unit(inner, &name, u, &mut app.rec);
                }
            }
        }
        app.rec.units = units;
        if app.rec != before {
            if let Err(e) = inner.store.save(&app.rec) {
                app.rt.error = Some(format!("store: {e:#}"));
            }
        }
    }
}

/// The data-plane host with the fewest data planes of this appliance and units of others per
/// CPU, and the next free backplane port on it.
fn place_dataplane(
    hosts: &Hosts,
    appliance: &str,
    units: &[UnitRecord],
    planned: &[(String, SocketAddr)],
) -> (String, SocketAddr) {
    // Fewest data planes per CPU: compared as n/cpus < best_n/best_cpus without division.
    let mut best = (usize::MAX, 1u32, 0);
    for (i, h) in hosts.dataplanes.iter().enumerate() {
        let n = units
            .iter()
            .filter(|u| {
                u.role == UnitRole::Dataplane && u.host == h.name && u.state != UnitState::Stopped
            })
            .count()
            + planned.iter().filter(|(p, _)| *p == h.name).count()
            + h.running.iter().filter(|a| *a != appliance).count();
        let fewer = best.0 == usize::MAX || n * (best.1 as usize) < best.0 * (h.cpus as usize);
        if fewer {
            best = (n, h.cpus, i);
        }
    }
    let host = &hosts.dataplanes[best.2];
    let (ns, ip) = (host.name.clone(), host.backplane);
    let used: Vec<u16> = units
        .iter()
        .filter(|u| u.host == ns)
        .filter_map(|u| u.addr.map(|a| a.port()))
        .chain(
            planned
                .iter()
                .filter(|(h, _)| *h == ns)
                .map(|(_, a)| a.port()),
        )
        .collect();
    let port = (BACKPLANE_PORT..u16::MAX)
        .find(|p| !used.contains(p))
        .unwrap_or(BACKPLANE_PORT);
    (ns, SocketAddr::new(ip, port))
}

/// `units.json` in the run directory: where `dva stats` and the tests find the units' sockets.
fn write_units_json(inner: &Inner, app: &mut Appliance, hosts: &Hosts) {
    let port = app.rec.manager_port.unwrap_or(MANAGER_PORT);
    let dir = run_dir(inner, &app.rec.name);
    let units: Vec<serde_json::Value> = app
        .rec
        .units
        .iter()
        .filter(|u| matches!(u.state, UnitState::Ready | UnitState::Draining))
        .map(|u| {
            let l = launch(inner, &app.rec.name, u);
            serde_json::json!({
                "id": u.id,
                "role": u.role.as_str(),
                "host": u.host,
                "pid": u.pid,
                "state": u.state,
                "backplane": u.addr,
                // Where a manager listens (it does once it leads).
                "channel": (u.role == UnitRole::Manager)
                    .then(|| manager_addr(hosts, &u.host, port))
                    .flatten(),
                "control": l.control,
                "log": l.log,
            })
        })
        .collect();
    let text = serde_json::to_string_pretty(&units).unwrap_or_default();
    if text == app.rt.units_json {
        return;
    }
    // Root and our user only, like everything in the run directory.
    let _ = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir);
    let tmp = dir.join("units.json.tmp");
    let written = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| f.write_all(text.as_bytes()));
    if written.is_ok() && std::fs::rename(&tmp, dir.join("units.json")).is_ok() {
        app.rt.units_json = text;
    }
}

pub(crate) fn view(inner: &Inner, app: &Appliance) -> ApplianceView {
    let l = &app.spec.spec.layout.dataplanes;
    let status = app.rt.link.as_ref().and_then(|l| l.status());
    let by_id: BTreeMap<u32, &UnitStatus> = status
        .as_ref()
        .map(|s| s.units.iter().map(|u| (u.id, u)).collect())
        .unwrap_or_default();
    let units: Vec<UnitView> = app
        .rec
        .units
        .iter()
        .map(|u| {
            let s = by_id.get(&u.id);
            let report = s.and_then(|s| s.report.as_ref());
            let mut packets = report.map_or(0, |r| r.rx_packets);
            if u.role == UnitRole::Manager {
                packets = 0;
            }
            UnitView {
                id: u.id,
                role: u.role,
                host: u.host.clone(),
                state: u.state,
                pid: u.pid,
                config_version: s.map_or(0, |s| s.acked),
                packets,
                flows: report.map_or(0, |r| r.flows),
                buckets: (u.role == UnitRole::Dataplane).then(|| s.map_or(0, |s| s.buckets)),
                leader: (u.role == UnitRole::Manager)
                    .then(|| status.as_ref().is_some_and(|s| s.leader == u.id)),
                error: s.and_then(|s| s.nack.clone()),
            }
        })
        .collect();
    let ready_dps = units
        .iter()
        .filter(|u| u.role == UnitRole::Dataplane && u.state == UnitState::Ready)
        .count() as u32;
    let draining = units
        .iter()
        .filter(|u| u.role == UnitRole::Dataplane && u.state == UnitState::Draining)
        .count() as u32;
    let error = app
        .rt
        .error
        .clone()
        .or_else(|| status.as_ref().and_then(|s| s.error.clone()));
    let all_ready = !units.is_empty()
        && units
            .iter()
            .filter(|u| u.state != UnitState::Draining && u.state != UnitState::Stopped)
            .all(|u| u.state == UnitState::Ready)
        && ready_dps == app.rec.dataplanes
        // Serving means owning a share of the buckets, not just holding a config.
        && units
            .iter()
            .filter(|u| u.role == UnitRole::Dataplane && u.state == UnitState::Ready)
            .all(|u| u.buckets.unwrap_or(0) > 0)
        && units
            .iter()
            .any(|u| u.role == UnitRole::Dispatcher && u.state == UnitState::Ready);
    let converged = status.as_ref().is_some_and(|s| s.converged);
    let status_word = if app.deleting {
        ApplianceStatus::Deleting
    } else if all_ready && converged && error.is_none() {
        ApplianceStatus::Ready
    } else if error.is_some() && app.rec.units.iter().any(|u| u.state == UnitState::Ready) {
        ApplianceStatus::Degraded
    } else {
        ApplianceStatus::Pending
    };
    let _ = inner;
    // Backend health: the same majority vote the manager applies to the data planes.
    let mut backends: BTreeMap<(String, String), BackendView> = BTreeMap::new();
    for u in app
        .rec
        .units
        .iter()
        .filter(|u| u.role == UnitRole::Dispatcher)
    {
        let Some(r) = by_id
            .get(&u.id)
            .filter(|s| s.connected)
            .and_then(|s| s.report.as_ref())
        else {
            continue;
        };
        for h in &r.health {
            let b = backends
                .entry((h.service.clone(), h.backend.clone()))
                .or_insert_with(|| BackendView {
                    service: h.service.clone(),
                    backend: h.backend.clone(),
                    health: String::new(),
                    up_votes: 0,
                    checks: 0,
                    error: None,
                });
            b.checks += 1;
            b.up_votes += u32::from(h.up);
            if !h.up && b.error.is_none() {
                b.error = h.error.clone();
            }
        }
    }
    let backends: Vec<BackendView> = backends
        .into_values()
        .map(|mut b| {
            b.health = if b.checks - b.up_votes > b.up_votes {
                "down".into()
            } else {
                "up".into()
            };
            b
        })
        .collect();
    ApplianceView {
        name: app.rec.name.clone(),
        status: status_word,
        generation: app.rec.generation,
        config_version: status.as_ref().map_or(0, |s| s.version),
        dataplanes: DataplaneCounts {
            desired: app.rec.dataplanes,
            ready: ready_dps,
            draining,
            min: l.min,
            max: l.max,
        },
        units,
        error,
        backends,
        spec: app.rec.spec_text.clone(),
    }
}

/// Stop every unit of an appliance (SIGTERM, then SIGKILL after 5 s), then forget it.
pub(crate) fn delete(inner: &Inner, name: &str) -> anyhow::Result<()> {
    let (units, launches): (Vec<UnitRecord>, Vec<UnitLaunch>) = {
        let mut all = inner.lock();
        let Some(app) = all.get_mut(name) else {
            return Ok(());
        };
        app.rt.link = None;
        let units = app.rec.units.clone();
        let launches = units.iter().map(|u| launch(inner, name, u)).collect();
        (units, launches)
    };
    // Data path first, manager last, so no unit is left reconnecting to nothing.
    let order = |u: &UnitRecord| match u.role {
        UnitRole::Dataplane => 0,
        UnitRole::Dispatcher => 1,
        UnitRole::Manager => 2,
    };
    let mut pairs: Vec<(UnitRecord, UnitLaunch)> = units.into_iter().zip(launches).collect();
    pairs.sort_by_key(|(u, _)| order(u));
    // Every process that is a unit: the recorded one, or for a unit recorded without a live pid
    // (a crash between starting it and saving the pid) whatever runs its command line.
    let procs: Vec<(UnitProcess, &UnitLaunch)> = pairs
        .iter()
        .flat_map(
            |(u, l)| match process(u).filter(|&p| inner.provisioner.alive(p, l)) {
                Some(p) => vec![(p, l)],
                None => inner
                    .provisioner
                    .find(l)
                    .into_iter()
                    .map(|p| (p, l))
                    .collect(),
            },
        )
        .collect();
    for &(p, l) in &procs {
        inner.provisioner.stop(p, l);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left: Vec<&(UnitProcess, &UnitLaunch)> = procs
            .iter()
            .filter(|(p, l)| inner.provisioner.alive(*p, l))
            .collect();
        if left.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            for &&(p, l) in &left {
                inner.provisioner.kill(p, l);
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    inner.lock().remove(name);
    inner.store.remove(name)?;
    let _ = std::fs::remove_dir_all(run_dir(inner, name));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, cpus: u32, running: &[&str]) -> Host {
        Host {
            name: name.into(),
            backplane: IpAddr::from([198, 19, 0, 2]),
            netns: None,
            cpus,
            running: running.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// Data planes go where fewest units run per CPU, other appliances' units counted.
    #[test]
    fn data_planes_go_to_free_capacity() {
        let hosts = Hosts {
            dispatchers: Vec::new(),
            dataplanes: vec![host("a", 1, &["other"]), host("b", 2, &[])],
            managers: Vec::new(),
            lab: None,
            agents: true,
        };
        let mut planned = Vec::new();
        let mut placed = Vec::new();
        for _ in 0..4 {
            let (h, addr) = place_dataplane(&hosts, "edge-fw", &[], &planned);
            planned.push((h.clone(), addr));
            placed.push(h);
        }
        // b (2 CPUs, empty) takes two before a (1 CPU, one unit of another appliance) takes one.
        assert_eq!(placed, ["b", "b", "a", "b"]);
        // Ports on one host do not collide.
        let ports: Vec<u16> = planned
            .iter()
            .filter(|(h, _)| h == "b")
            .map(|(_, a)| a.port())
            .collect();
        assert_eq!(
            ports,
            [BACKPLANE_PORT, BACKPLANE_PORT + 1, BACKPLANE_PORT + 2]
        );
    }
}
