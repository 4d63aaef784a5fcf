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
//! A pass over one appliance is snapshot → observe → [`plan`](plan::plan) → execute → commit:
//! the decisions are a pure function of the record, what was observed and the hosts (tested as
//! data in [`plan`]); the I/O runs without the appliances' lock, so API calls never wait on a
//! process start, an agent or `ip` (see `reconcile_one`).
//!
//! The store is written before anything is started, so a restart finds every unit it started.

mod plan;
mod topology;

pub use plan::{Host, Hosts, Place};
pub use topology::Topology;

use std::collections::BTreeMap;
use std::io::{BufReader, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dva_flow::BucketTable;
use dva_proto::channel::{self, Desired, FromManager, ManagerStatus, ToManager, UnitStatus};
use dva_proto::{compile, ApplianceSpec, Placement, UnitEndpoint};
use dva_unit::tls::{self, TlsWriter};

use crate::autoscale::Autoscaler;
use crate::core::{push_event, Appliance, Inner};
use crate::model::*;
use crate::provision::{UnitLaunch, UnitProcess};
use plan::{manager_addr, Action, Liveness, Observed, Snapshot};
use plan::{BACKPLANE_PORT, MANAGER_PORT};
use topology::{AgentHosts, Nowhere, ThisMachine};

const PERIOD: Duration = Duration::from_millis(200);
/// How long the link to a manager may take to connect and finish its TLS handshake (the
/// reconciler waits for it).
const LINK_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the link to a manager may be silent before it counts as broken.
const LINK_SILENT: Duration = Duration::from_secs(3);

/// What the reconciler knows at run time about one appliance (never stored).
#[derive(Default)]
pub struct Runtime {
    /// Shared with a pass that uses it outside the appliances' lock.
    link: Option<Arc<ManagerLink>>,
    /// When the desired state was last sent (ms), and what it was.
    desired_sent: Option<(u64, Desired)>,
    /// Why the appliance cannot be reconciled right now (no lab, a unit that fails to start).
    error: Option<String>,
    /// Draining data planes that looked empty, and since when (ms).
    drain_clear: BTreeMap<u32, u64>,
    units_json: String,
    pub(crate) autoscaler: Autoscaler,
    /// Dispatcher hosts the upstream routes point at.
    ecmp: Vec<usize>,
}

struct ManagerLink {
    /// Locked only by the reconciler's pass that sends; a pass and `delete` never contend.
    writer: Mutex<TlsWriter>,
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
        // The manager sends its status at least every second: silence is a manager (or machine)
        // that is gone without closing anything, and the next pass links to its successor.
        reader.set_read_timeout(Some(LINK_SILENT))?;
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
            writer: Mutex::new(writer),
            status,
            alive,
        })
    }

    fn status(&self) -> Option<ManagerStatus> {
        self.status.lock().ok().and_then(|g| g.clone())
    }
}

/// `lab`: the hosts of a lab, when the management tool was opened on one (with neither agents nor
/// `local`, units go there).
pub(crate) fn run(inner: &Inner, mut lab: Option<Box<dyn Topology>>) {
    let mut agents = AgentHosts(&inner.registry);
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
        // Agents' hosts, once any registered, whatever the options say: their states change
        // every poll, so they are read every pass (no I/O).
        let mut nowhere = Nowhere;
        let topology: &mut dyn Topology = if !inner.registry.is_empty() {
            &mut agents
        } else if inner.opts.local {
            &mut ThisMachine
        } else {
            match lab.as_deref_mut() {
                Some(lab) => lab,
                None => &mut nowhere,
            }
        };
        let hosts = topology.hosts();
        let names: Vec<String> = inner.lock().keys().cloned().collect();
        for name in names {
            // Fencing: a leader whose lease may have run out stops at once, mid-pass.
            if inner.leadership.as_ref().is_some_and(|l| l.term() != led) {
                break;
            }
            reconcile_one(inner, &name, hosts.as_ref(), &*topology);
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

/// One appliance's pass: snapshot, observe, plan, execute, commit.
///
/// The appliances' lock is held only to take the snapshot, to record the units about to start
/// (and store them: a crash in between must leave a record to reconcile), and to commit the
/// results. Starting and stopping processes, agents' HTTP calls, the manager link and `ip` run
/// without it, so API calls do not wait on them. The store is still written under the lock, as
/// API writes do, so it never holds an older record than memory.
///
/// An API write may land while the actions run:
/// * **scale / apply** (the generation moves): what the pass found out is still true (a process
///   died, a unit started with this pid, a drained unit was stopped, a unit turned ready) and is
///   merged; what it decided from the old desired state (draining a data plane, exporting one
///   past its deadline, the autoscaler's count and samples) is dropped, and the next pass
///   decides again from the new record. Units started for the old count stay recorded (a write
///   never drops units: it copies the record the pass already stored them in), so a scale-down
///   meanwhile drains them like any other. A desired state already sent for the old generation
///   is replaced on the next pass (it differs from the new one, so it is due at once). When the
///   pass starts units, a write that lands before they are recorded cancels the whole pass
///   (nothing was done yet).
/// * **delete** (the appliance is `deleting` or gone): nothing is committed, and the processes
///   this pass started are stopped here: `delete` may have listed the units before their
///   processes existed, and would leave them running.
fn reconcile_one(inner: &Inner, name: &str, hosts: Option<&Hosts>, topology: &dyn Topology) {
    let Some((snap, link, ports)) = snapshot(inner, name, hosts) else {
        return;
    };
    let Some(hosts) = hosts else {
        return;
    };
    let obs = observe(inner, &snap, link.as_deref(), hosts, &ports);
    let now = now_ms();
    let actions = plan::plan(&snap, &obs, hosts, now);
    if actions
        .iter()
        .any(|a| matches!(a, Action::StartUnit { .. }))
        && !record_starts(inner, &snap, &actions)
    {
        return;
    }
    let link = link.filter(|_| obs.link_up);
    let outcome = execute(inner, &snap, link.as_ref(), &actions, topology);
    let committed = {
        let mut all = inner.lock();
        match all.get_mut(name).filter(|a| !a.deleting) {
            Some(app) => {
                commit(inner, app, &snap, &obs, &actions, outcome, now);
                Some((app.rec.clone(), app.rt.units_json.clone()))
            }
            None => {
                drop(all);
                stop_started(inner, &snap, &actions, &outcome);
                None
            }
        }
    };
    // As before the split, an appliance with nowhere to place units publishes nothing.
    if let (Some((rec, published)), false) = (committed, hosts.dataplanes.is_empty()) {
        if let Some(text) = write_units_json(inner, &rec, hosts, &published) {
            if let Some(app) = inner.lock().get_mut(name) {
                app.rt.units_json = text;
            }
        }
    }
}

/// The record and run-time state the pass plans from, the manager link, and the manager ports
/// other appliances hold; `None` when the appliance is gone, being deleted, or has no hosts.
fn snapshot(
    inner: &Inner,
    name: &str,
    hosts: Option<&Hosts>,
) -> Option<(Snapshot, Option<Arc<ManagerLink>>, Vec<u16>)> {
    let mut all = inner.lock();
    let ports: Vec<u16> = all.values().filter_map(|a| a.rec.manager_port).collect();
    let app = all.get_mut(name)?;
    if app.deleting {
        return None;
    }
    if hosts.is_none() {
        app.rt.error = Some(format!(
            "no lab with prefix {:?} (create it with `dva lab up --prefix {}`, or run `dva \
             agent` on the machines units may use)",
            inner.opts.lab_prefix, inner.opts.lab_prefix
        ));
        return None;
    }
    let snap = Snapshot {
        rec: app.rec.clone(),
        spec: app.spec.clone(),
        error: app.rt.error.clone(),
        drain_clear: app.rt.drain_clear.clone(),
        autoscaler: app.rt.autoscaler.clone(),
        ecmp: app.rt.ecmp.clone(),
        desired_sent: app.rt.desired_sent.clone(),
    };
    Some((snap, app.rt.link.clone(), ports))
}

/// The I/O a plan decides on: which unit processes run (found again by command line when the
/// recorded one is gone), which hosts are lost, the manager's status, which starting managers
/// are ready, and a free manager port when the record has none.
fn observe(
    inner: &Inner,
    snap: &Snapshot,
    link: Option<&ManagerLink>,
    hosts: &Hosts,
    ports: &[u16],
) -> Observed {
    let name = &snap.rec.name;
    let mut obs = Observed {
        lost_after_ms: inner.opts.host_lost_after.as_millis() as u64,
        ..Observed::default()
    };
    for u in &snap.rec.units {
        let l = launch(inner, name, u);
        let alive = process(u).is_some_and(|p| inner.provisioner.alive(p, &l));
        let liveness = if alive {
            Liveness::Alive
        } else {
            match inner.provisioner.find(&l).split_first() {
                Some((&first, rest)) => Liveness::Found {
                    first,
                    duplicates: rest.to_vec(),
                },
                None => Liveness::Gone,
            }
        };
        if liveness == Liveness::Gone
            && inner.registry.state(&u.host) == Some(crate::hosts::HostState::Lost)
        {
            obs.lost_hosts.insert(u.host.clone());
        }
        if u.role == UnitRole::Manager
            && u.state == UnitState::Starting
            && liveness != Liveness::Gone
        {
            if let Ok((200, _)) =
                inner
                    .provisioner
                    .control_get(&l, "/ready", Duration::from_millis(300))
            {
                obs.managers_ready.insert(u.id);
            }
        }
        obs.units.insert(u.id, liveness);
    }
    obs.link_up = link.is_some_and(|l| l.alive.load(Ordering::Acquire));
    // A link that just died still tells the last status it received.
    obs.status = link.and_then(|l| l.status());
    if snap.rec.manager_port.is_none() {
        obs.manager_port =
            pick_manager_port(ports, inner.opts.local && hosts.place != Place::Agents);
    }
    obs
}

/// Record the units about to start (and the manager port) in the record, and store it, before
/// any process starts. Returns false when the pass must not go on: an API write changed the
/// appliance since the snapshot (the plan is stale), or the store failed.
fn record_starts(inner: &Inner, snap: &Snapshot, actions: &[Action]) -> bool {
    let mut all = inner.lock();
    let Some(app) = all
        .get_mut(&snap.rec.name)
        .filter(|a| !a.deleting && a.rec.generation == snap.rec.generation)
    else {
        return false;
    };
    let before = app.rec.clone();
    for a in actions {
        match a {
            Action::SetManagerPort(p) => app.rec.manager_port = Some(*p),
            Action::StartUnit { unit, .. } => {
                app.rec.units.push(unit.clone());
                app.rec.next_unit_id = app.rec.next_unit_id.max(unit.id + 1);
            }
            _ => {}
        }
    }
    if let Err(e) = inner.store.save(&app.rec) {
        app.rec = before;
        app.rt.error = Some(format!("store: {e:#}"));
        return false;
    }
    true
}

/// What executing a plan did, for [`commit`].
#[derive(Default)]
struct Outcome {
    /// Per unit started: its process, or why it did not start.
    started: BTreeMap<u32, Result<UnitProcess, String>>,
    /// A link connected this pass.
    link: Option<Arc<ManagerLink>>,
    /// The desired state the manager was sent (without units that failed to start).
    sent: Option<Desired>,
    /// Sending failed: the link is dropped.
    link_broken: bool,
    /// The upstream routes now point at these dispatcher hosts, or why they could not.
    ecmp: Option<Result<Vec<usize>, String>>,
}

/// Run the plan's I/O, in order, without the appliances' lock.
fn execute(
    inner: &Inner,
    snap: &Snapshot,
    link: Option<&Arc<ManagerLink>>,
    actions: &[Action],
    topology: &dyn Topology,
) -> Outcome {
    let name = &snap.rec.name;
    let recorded = |id: u32| snap.rec.units.iter().find(|u| u.id == id);
    let mut out = Outcome::default();
    for a in actions {
        match a {
            Action::StopDuplicate { id, process, .. } => {
                if let Some(u) = recorded(*id) {
                    inner.provisioner.stop(*process, &launch(inner, name, u));
                }
            }
            Action::StartUnit {
                unit,
                managers,
                listen,
            } => {
                let mut l = launch(inner, name, unit);
                l.managers = managers.clone();
                l.listen = listen.clone();
                let started = inner
                    .pki
                    .issue_unit(name, unit.id, unit.role == UnitRole::Manager)
                    .and_then(|issued| {
                        l.credentials = Some(issued);
                        inner.provisioner.start(&l)
                    })
                    .map_err(|e| format!("{e:#}"));
                out.started.insert(unit.id, started);
            }
            Action::ConnectManager { candidates } => {
                for (addr, netns) in candidates {
                    if let Ok(l) = ManagerLink::connect(inner, name, *addr, netns.as_deref()) {
                        out.link = Some(Arc::new(l));
                        break;
                    }
                }
            }
            Action::SendDesired(d) => {
                let Some(l) = out.link.as_ref().or(link) else {
                    continue;
                };
                let mut d = (**d).clone();
                d.units
                    .retain(|u| !matches!(out.started.get(&u.id), Some(Err(_))));
                let msg = ToManager::Desired(Box::new(d.clone()));
                let sent = match l.writer.lock() {
                    Ok(mut w) => channel::send(&mut *w, &msg).is_ok(),
                    Err(_) => false,
                };
                if sent {
                    out.sent = Some(d);
                } else {
                    out.link_broken = true;
                }
            }
            Action::StopUnit {
                id,
                process: Some(p),
                ..
            } => {
                if let Some(u) = recorded(*id) {
                    inner.provisioner.stop(*p, &launch(inner, name, u));
                }
            }
            Action::SetEcmp(serving) => {
                out.ecmp = Some(topology.set_upstream(serving).map(|()| serving.clone()));
            }
            _ => {}
        }
    }
    out
}

/// Apply a pass's actions and their results to the appliance as it is now (not as it was at the
/// snapshot: API writes meanwhile are kept), under the lock. See [`reconcile_one`] for what an
/// API write in between changes.
fn commit(
    inner: &Inner,
    app: &mut Appliance,
    snap: &Snapshot,
    obs: &Observed,
    actions: &[Action],
    mut outcome: Outcome,
    now: u64,
) {
    let before = app.rec.clone();
    // Decisions made from the desired state hold only if nobody changed it meanwhile.
    let fresh = app.rec.generation == snap.rec.generation;
    if !obs.link_up {
        app.rt.link = None;
        app.rt.desired_sent = None;
    }
    let rec = &mut app.rec;
    let rt = &mut app.rt;
    let unit = |rec: &mut ApplianceRecord, id: u32| rec.units.iter_mut().position(|u| u.id == id);
    for a in actions {
        match a {
            Action::ForgetUnit {
                id,
                reason,
                message,
            } => {
                rec.units.retain(|u| u.id != *id);
                rt.drain_clear.remove(id);
                push_event(rec, reason, message.clone());
            }
            Action::StopDuplicate { message, .. } => {
                push_event(rec, "unit-duplicate", message.clone());
            }
            Action::Adopt {
                id,
                process,
                message,
            } => {
                if let Some(i) = unit(rec, *id) {
                    rec.units[i].pid = Some(process.pid);
                    rec.units[i].pid_start = process.start;
                }
                if let Some(m) = message {
                    push_event(rec, "unit-adopted", m.clone());
                }
            }
            Action::SetError(e) => rt.error = Some(e.clone()),
            Action::ClearError(prefix) => {
                if rt.error.as_deref().is_some_and(|e| e.starts_with(prefix)) {
                    rt.error = None;
                }
            }
            // Recorded before the processes started (`record_starts`).
            Action::SetManagerPort(_) => {}
            Action::StartUnit { unit: nu, .. } => match outcome.started.remove(&nu.id) {
                Some(Ok(p)) => {
                    if let Some(i) = unit(rec, nu.id) {
                        rec.units[i].pid = Some(p.pid);
                        rec.units[i].pid_start = p.start;
                    }
                    let msg = format!(
                        "{} unit {} on {} (pid {})",
                        nu.role.as_str(),
                        nu.id,
                        nu.host,
                        p.pid
                    );
                    push_event(rec, "unit-started", msg);
                }
                Some(Err(msg)) => {
                    rec.units.retain(|u| u.id != nu.id);
                    push_event(rec, "unit-failed", msg.clone());
                    rt.error = Some(msg);
                }
                None => {}
            },
            Action::DrainUnit { id, at, message } if fresh => {
                if let Some(i) = unit(rec, *id) {
                    rec.units[i].state = UnitState::Draining;
                    rec.units[i].draining_since_ms = Some(*at);
                }
                push_event(rec, "unit-draining", message.clone());
            }
            Action::ConnectManager { .. } => {
                if let Some(l) = outcome.link.take() {
                    rt.link = Some(l);
                    rt.desired_sent = None;
                }
            }
            Action::SendDesired(_) => {
                if let Some(d) = outcome.sent.take() {
                    rt.desired_sent = Some((now, d));
                }
                if outcome.link_broken {
                    rt.link = None;
                }
            }
            Action::UnitReady { id, message } => {
                if let Some(i) = unit(rec, *id) {
                    rec.units[i].state = UnitState::Ready;
                }
                if let Some(m) = message {
                    push_event(rec, "unit-ready", m.clone());
                }
            }
            Action::Export { id, at, message } if fresh => {
                if let Some(i) = unit(rec, *id) {
                    rec.units[i].exporting_since_ms = Some(*at);
                }
                push_event(rec, "unit-exporting", message.clone());
            }
            // The process was asked to stop: that holds whatever the API did meanwhile.
            Action::StopUnit { id, message, .. } => {
                if let Some(i) = unit(rec, *id) {
                    rec.units[i].state = UnitState::Stopped;
                }
                push_event(rec, "unit-drained", message.clone());
            }
            Action::DrainClear { id, since } => match since {
                Some(t) => {
                    rt.drain_clear.insert(*id, *t);
                }
                None => {
                    rt.drain_clear.remove(id);
                }
            },
            Action::Autoscale { target, reason } if fresh => {
                rec.dataplanes = *target;
                rec.generation += 1;
                push_event(rec, "autoscale", reason.clone());
            }
            Action::Autoscaler(a) if fresh => rt.autoscaler = (**a).clone(),
            Action::SetEcmp(_) => match outcome.ecmp.take() {
                Some(Ok(serving)) => {
                    let msg = format!(
                        "upstream routes now spread flows over dispatcher host(s) {serving:?}"
                    );
                    push_event(rec, "routes", msg);
                    rt.ecmp = serving;
                }
                Some(Err(e)) => rt.error = Some(format!("updating upstream routes: {e}")),
                None => {}
            },
            Action::DrainUnit { .. } | Action::Export { .. } | Action::Autoscale { .. } => {}
            Action::Autoscaler(_) => {}
        }
    }
    if app.rec != before {
        if let Err(e) = inner.store.save(&app.rec) {
            app.rt.error = Some(format!("store: {e:#}"));
        }
    }
}

/// The appliance was deleted while this pass started units: stop what it started (see
/// [`reconcile_one`]).
fn stop_started(inner: &Inner, snap: &Snapshot, actions: &[Action], outcome: &Outcome) {
    for a in actions {
        let Action::StartUnit { unit, .. } = a else {
            continue;
        };
        if let Some(Ok(p)) = outcome.started.get(&unit.id) {
            tracing::info!(
                appliance = %snap.rec.name,
                "{} unit {} on {} started while the appliance was deleted: stopping it",
                unit.role.as_str(),
                unit.id,
                unit.host
            );
            inner
                .provisioner
                .stop(*p, &launch(inner, &snap.rec.name, unit));
        }
    }
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
        let mut all = inner.lock();
        // No record: the appliance was deleted (its units are being stopped; this is the
        // sweep's copy of that stop, for a unit the delete could not reach).
        let why = if all.contains_key(&au.appliance) {
            "is no longer the appliance's (its host was lost, the unit replaced)"
        } else {
            "belongs to a deleted appliance"
        };
        let msg = format!(
            "{} unit {} on {} (pid {}) {why}: stopping it",
            au.role.as_str(),
            au.id,
            host,
            au.pid
        );
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
        rec_events.push(("unit-duplicate", plan::duplicate_message(u, dup.pid)));
    }
    if u.pid != Some(first.pid) {
        rec_events.push(("unit-adopted", plan::adopted_message(u, first.pid)));
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
///
/// The records are read under a short lock and the provisioner is asked without it (an agent's
/// host answers over HTTP, a lost one only after its timeout): API calls never wait on it. A
/// record an API call changed meanwhile is left as it now is; its next pass adopts what this one
/// would have (the plan adopts any unit whose process it finds).
pub(crate) fn adopt_all(inner: &Inner) {
    let records: Vec<ApplianceRecord> = inner.lock().values().map(|a| a.rec.clone()).collect();
    for before in records {
        let mut rec = before.clone();
        let name = rec.name.clone();
        let mut units = std::mem::take(&mut rec.units);
        for u in units.iter_mut() {
            let l = launch(inner, &name, u);
            match process(u).filter(|&p| inner.provisioner.alive(p, &l)) {
                Some(p) if p.start.is_some() => {}
                Some(p) => u.pid_start = crate::provision::start_time(p.pid),
                None => {
                    adopt_unit(inner, &name, u, &mut rec);
                }
            }
        }
        rec.units = units;
        if rec == before {
            continue;
        }
        let mut all = inner.lock();
        let Some(app) = all.get_mut(&name).filter(|a| a.rec == before) else {
            continue;
        };
        app.rec = rec;
        if let Err(e) = inner.store.save(&app.rec) {
            app.rt.error = Some(format!("store: {e:#}"));
        }
    }
}

/// `units.json` in the run directory: where `dva stats` and the tests find the units' sockets.
/// Returns what it wrote, when it differs from what was `published` and the write succeeded.
fn write_units_json(
    inner: &Inner,
    rec: &ApplianceRecord,
    hosts: &Hosts,
    published: &str,
) -> Option<String> {
    let port = rec.manager_port.unwrap_or(MANAGER_PORT);
    let dir = run_dir(inner, &rec.name);
    let units: Vec<serde_json::Value> = rec
        .units
        .iter()
        .filter(|u| matches!(u.state, UnitState::Ready | UnitState::Draining))
        .map(|u| {
            let l = launch(inner, &rec.name, u);
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
    if text == published {
        return None;
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
    (written.is_ok() && std::fs::rename(&tmp, dir.join("units.json")).is_ok()).then_some(text)
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
