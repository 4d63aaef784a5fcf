//! The reconciler's decisions, apart from its I/O: [`plan`] turns an appliance's record (what
//! it should be), what a pass observed (which unit processes run, the manager's status, lost
//! hosts) and where units may go ([`Hosts`]) into a list of [`Action`]s.
//!
//! No clock, no syscall, no lock: `now` comes from the caller, so a pass is deterministic and is
//! tested as data (see the tests below). The caller executes the actions outside the appliances'
//! lock and commits their results (see `super::commit`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use dva_proto::channel::{Desired, DesiredRole, DesiredUnit, ManagerStatus, UnitStatus};
use dva_proto::ApplianceSpec;

use crate::autoscale::Autoscaler;
use crate::model::*;
use crate::provision::UnitProcess;

/// GENEVE's IANA port; further units on one host take the next ports.
pub(crate) const BACKPLANE_PORT: u16 = 6081;
/// The first port an appliance's managers may listen on; each appliance of this management
/// tool gets its own, kept in its record.
pub(crate) const MANAGER_PORT: u16 = 7443;
/// A draining data plane must look empty this long before it is stopped (reports are 4 Hz).
const DRAIN_CLEAR_FOR_MS: u64 = 1000;
/// Once exporting, a unit holds no flows within milliseconds: no need to watch it stay empty
/// for long.
const EXPORT_CLEAR_FOR_MS: u64 = 300;
/// Desired state is re-sent this often even when unchanged (a restarted manager needs it).
const DESIRED_EVERY_MS: u64 = 1000;
/// A data plane exporting its state is stopped after this long whatever it still holds.
const EXPORT_LIMIT_MS: u64 = 5_000;

/// A host units can be placed on: its name (a lab host's network namespace, or this machine's
/// host name) and the address its units' backplane sockets bind.
#[derive(Debug, Clone)]
pub struct Host {
    pub name: String,
    pub backplane: IpAddr,
    /// The network namespace its units run in, as seen from `dva serve` (a lab host); `None`:
    /// ours, or another machine's (an agent's host, reached over the network).
    pub netns: Option<String>,
    /// Its CPUs (agents' hosts; 1 elsewhere): data planes go where fewest run per CPU.
    pub cpus: u32,
    /// The appliance of each unit its agent last reported (agents' hosts): other appliances'
    /// units take capacity too.
    pub running: Vec<String>,
    /// The labels its agent registered with (`dva agent --label`): what a spec's
    /// `layout.host_selector` picks hosts by.
    pub labels: BTreeMap<String, String>,
}

/// Where units may go: the hosts of registered agents, the lab's hosts, or this machine alone.
#[derive(Debug, Clone)]
pub struct Hosts {
    pub dispatchers: Vec<Host>,
    pub dataplanes: Vec<Host>,
    /// Every host a manager may be on (including agents' hosts not ready right now, where a
    /// manager may still run): where its channel address is looked up, and what units are told.
    pub managers: Vec<Host>,
    pub place: Place,
    /// Upstream routers spread flows over the dispatcher hosts (a lab with several): a pass
    /// points them at those whose dispatcher serves.
    pub upstream: bool,
}

/// What kind of hosts these are, for what a pass tells the user.
#[derive(Debug, Clone, PartialEq)]
pub enum Place {
    Lab {
        prefix: String,
    },
    /// Agents' hosts (`dva agent`).
    Agents,
    ThisMachine,
}

impl Hosts {
    /// The hosts new units of an appliance whose spec asks for `selector` may go on (every label
    /// of it carried). Where a manager may already run is not narrowed: its address is still
    /// looked up there (a selector applies to what is placed from then on, as Kubernetes'
    /// `nodeSelector`).
    pub fn selected(&self, selector: &BTreeMap<String, String>) -> Hosts {
        let carries = |h: &&Host| selector.iter().all(|(k, v)| h.labels.get(k) == Some(v));
        Hosts {
            dispatchers: self.dispatchers.iter().filter(carries).cloned().collect(),
            dataplanes: self.dataplanes.iter().filter(carries).cloned().collect(),
            managers: self.managers.clone(),
            place: self.place.clone(),
            upstream: self.upstream,
        }
    }

    /// The network namespace `dva serve` reaches units of `host` from.
    pub fn netns_of(&self, host: &str) -> Option<&str> {
        self.managers
            .iter()
            .chain(&self.dispatchers)
            .find(|h| h.name == host)
            .and_then(|h| h.netns.as_deref())
    }

    pub(crate) fn describe(&self) -> String {
        match &self.place {
            Place::Lab { prefix } => format!("lab {prefix}"),
            Place::Agents => "the registered hosts".to_string(),
            Place::ThisMachine => "this machine".to_string(),
        }
    }
}

/// What the record and the reconciler's run-time state held when the pass began.
#[derive(Debug, Clone)]
pub(crate) struct Snapshot {
    pub rec: ApplianceRecord,
    pub spec: ApplianceSpec,
    pub error: Option<String>,
    /// Draining data planes that looked empty, and since when (ms).
    pub drain_clear: BTreeMap<u32, u64>,
    pub autoscaler: Autoscaler,
    /// Dispatcher hosts the upstream routes point at.
    pub ecmp: Vec<usize>,
    /// When the desired state was last sent to the manager (ms), and what it was.
    pub desired_sent: Option<(u64, Desired)>,
}

/// Whether a unit's process runs, as the provisioner saw it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Liveness {
    /// The recorded process is the unit.
    Alive,
    /// Not the recorded process, but processes that run the unit's command line (a crash of the
    /// management tool between starting the unit and saving its pid): the oldest is the unit.
    Found {
        first: UnitProcess,
        duplicates: Vec<UnitProcess>,
    },
    Gone,
}

/// What a pass observed (I/O done before planning, without the appliances' lock).
#[derive(Debug, Clone, Default)]
pub(crate) struct Observed {
    /// Per unit id; a unit not listed is taken as alive (no evidence of death).
    pub units: BTreeMap<u32, Liveness>,
    /// Hosts whose agent has not answered for `lost_after_ms`.
    pub lost_hosts: BTreeSet<String>,
    pub lost_after_ms: u64,
    /// The manager's last status (over the link, up or just lost).
    pub status: Option<ManagerStatus>,
    pub link_up: bool,
    /// Starting managers whose control socket says they are ready (leading or standing by).
    pub managers_ready: BTreeSet<u32>,
    /// A port free for the manager channel (looked up only while the record has none).
    pub manager_port: Option<u16>,
}

/// One step of a pass. Actions run in order; their events go to the record in that order.
#[derive(Debug, Clone)]
pub(crate) enum Action {
    /// A unit whose process is gone: drop it from the record.
    ForgetUnit {
        id: u32,
        reason: &'static str,
        message: String,
    },
    /// Stop a second process that runs a unit.
    StopDuplicate {
        id: u32,
        process: UnitProcess,
        message: String,
    },
    /// Record the process found running a unit as the unit's.
    Adopt {
        id: u32,
        process: UnitProcess,
        message: Option<String>,
    },
    SetError(String),
    /// Clear the appliance's error if it is of this kind (it starts with the prefix): the
    /// condition it described is gone.
    ClearError(&'static str),
    SetManagerPort(u16),
    /// Start a unit. It is recorded `Starting` and stored before its process starts, so a crash
    /// in between leaves a record to reconcile.
    StartUnit {
        unit: UnitRecord,
        /// Where the appliance's managers may listen (`tcp://ADDR:PORT,...`).
        managers: String,
        /// A manager's own channel address.
        listen: Option<String>,
    },
    /// Mark a data plane draining (it keeps its flows, gets no new ones).
    DrainUnit {
        id: u32,
        at: u64,
        message: String,
    },
    /// Connect to the first of these managers (address, network namespace) that answers: the
    /// leader (standbys do not listen).
    ConnectManager {
        candidates: Vec<(SocketAddr, Option<String>)>,
    },
    /// Send the desired state over the manager link.
    SendDesired(Box<Desired>),
    /// A unit serves (for a manager: leads or stands by).
    UnitReady {
        id: u32,
        message: Option<String>,
    },
    /// Tell a draining data plane to export its flows' state to the buckets' owners.
    Export {
        id: u32,
        at: u64,
        message: String,
    },
    /// Stop a drained data plane's process and record it stopped.
    StopUnit {
        id: u32,
        process: Option<UnitProcess>,
        message: String,
    },
    /// Since when a draining data plane looked empty (`None`: it does not any more).
    DrainClear {
        id: u32,
        since: Option<u64>,
    },
    /// The autoscaler's decision: a new data-plane count.
    Autoscale {
        target: u32,
        reason: String,
    },
    /// The autoscaler's state after this pass's samples.
    Autoscaler(Box<Autoscaler>),
    /// Point the lab's upstream routes at these dispatcher hosts.
    SetEcmp(Vec<usize>),
}

/// What an appliance's units should be told: the units that serve or drain, with their roles and
/// backplane addresses.
pub(crate) fn desired(rec: &ApplianceRecord, spec: &ApplianceSpec) -> Desired {
    Desired {
        generation: rec.generation,
        spec: spec.clone(),
        units: rec
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
    }
}

/// The record of one appliance's pass: the actions, and the record as they leave it (later
/// steps decide on what earlier ones changed, as one sequential pass would).
struct Pass<'a> {
    snap: &'a Snapshot,
    rec: ApplianceRecord,
    /// The error as the plan leaves it: what its conditions test.
    error: Option<String>,
    drain_clear: BTreeMap<u32, u64>,
    out: Vec<Action>,
}

impl Pass<'_> {
    fn set_error(&mut self, e: String) {
        self.error = Some(e.clone());
        self.out.push(Action::SetError(e));
    }

    fn clear_error(&mut self, prefix: &'static str) {
        if self.error.as_deref().is_some_and(|e| e.starts_with(prefix)) {
            self.error = None;
            self.out.push(Action::ClearError(prefix));
        }
    }
}

/// One reconciler pass over one appliance, as data. See the module doc.
pub(crate) fn plan(snap: &Snapshot, obs: &Observed, hosts: &Hosts, now: u64) -> Vec<Action> {
    let mut p = Pass {
        snap,
        rec: snap.rec.clone(),
        error: snap.error.clone(),
        drain_clear: snap.drain_clear.clone(),
        out: Vec::new(),
    };
    forget_dead(&mut p, obs);
    let selector = &snap.spec.spec.layout.host_selector;
    let selected = hosts.selected(selector);
    let hosts = &selected;
    if hosts.dataplanes.is_empty() {
        // Agents' hosts, none ready yet (or all lost), or none the spec selects: nothing can be
        // placed.
        p.set_error(if selector.is_empty() {
            "no ready host for data planes and managers (is `dva agent` running on them?)".into()
        } else {
            let labels: Vec<String> = selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
            format!(
                "no ready host for data planes and managers carries every label \
                 spec.layout.host_selector asks for ({}); `dva get hosts` shows the labels \
                 (`dva agent --label`)",
                labels.join(", ")
            )
        });
        return p.out;
    }
    p.clear_error("no ready host");
    if !layout(&mut p, obs, hosts, now) {
        return p.out;
    }
    let port = p.rec.manager_port.unwrap_or(MANAGER_PORT);
    manager_link(&mut p, obs, hosts, port, now);
    if let Some(st) = &obs.status {
        unit_states(&mut p, st, now);
    }
    autoscale(&mut p, obs, now);
    // A manager is ready (leading or standing by) once its control socket says so.
    for u in p.rec.units.iter_mut() {
        if u.role == UnitRole::Manager
            && u.state == UnitState::Starting
            && obs.managers_ready.contains(&u.id)
        {
            u.state = UnitState::Ready;
            p.out.push(Action::UnitReady {
                id: u.id,
                message: None,
            });
        }
    }
    p.clear_error("no lab");
    // Upstream ECMP over the dispatchers that serve: a dead one is withdrawn at once, its
    // replacement put back once ready (labs with several dispatcher hosts).
    if hosts.upstream {
        let serving: Vec<usize> = (hosts.dispatchers.iter().enumerate())
            .filter(|(_, h)| {
                p.rec.units.iter().any(|u| {
                    u.role == UnitRole::Dispatcher
                        && u.state == UnitState::Ready
                        && u.host == h.name
                })
            })
            .map(|(i, _)| i + 1)
            .collect();
        if !serving.is_empty() && serving != snap.ecmp {
            p.out.push(Action::SetEcmp(serving));
        }
    }
    p.out
}

/// The `unit-duplicate` event: a second process runs unit `u` and is stopped.
pub(super) fn duplicate_message(u: &UnitRecord, pid: u32) -> String {
    format!(
        "{} unit {} on {}: a second process (pid {pid}) runs it; stopping that one",
        u.role.as_str(),
        u.id,
        u.host
    )
}

/// The `unit-adopted` event: unit `u`'s process found running under `pid` and taken over.
pub(super) fn adopted_message(u: &UnitRecord, pid: u32) -> String {
    format!(
        "{} unit {} on {} found running (pid {pid}); adopted",
        u.role.as_str(),
        u.id,
        u.host
    )
}

/// 1. Units whose process is gone are forgotten (and so replaced below); processes found running
///    a unit whose recorded one is gone are adopted.
fn forget_dead(p: &mut Pass, obs: &Observed) {
    let mut kept = Vec::new();
    for mut u in std::mem::take(&mut p.rec.units) {
        match obs.units.get(&u.id) {
            None | Some(Liveness::Alive) => {
                kept.push(u);
                continue;
            }
            Some(Liveness::Found { first, duplicates }) => {
                for dup in duplicates {
                    p.out.push(Action::StopDuplicate {
                        id: u.id,
                        process: *dup,
                        message: duplicate_message(&u, dup.pid),
                    });
                }
                let message = (u.pid != Some(first.pid)).then(|| adopted_message(&u, first.pid));
                p.out.push(Action::Adopt {
                    id: u.id,
                    process: *first,
                    message,
                });
                u.pid = Some(first.pid);
                u.pid_start = first.start;
                kept.push(u);
                continue;
            }
            Some(Liveness::Gone) => {}
        }
        let (reason, message) = if u.state == UnitState::Stopped {
            (
                "unit-stopped",
                format!("{} unit {} on {} exited", u.role.as_str(), u.id, u.host),
            )
        } else if obs.lost_hosts.contains(&u.host) {
            (
                "unit-died",
                format!(
                    "{} unit {} on {}: the host is lost (its agent has not answered for {} ms); \
                     replacing it on another host",
                    u.role.as_str(),
                    u.id,
                    u.host,
                    obs.lost_after_ms
                ),
            )
        } else {
            (
                "unit-died",
                format!(
                    "{} unit {} on {} (pid {}) died; replacing it",
                    u.role.as_str(),
                    u.id,
                    u.host,
                    u.pid.unwrap_or(0)
                ),
            )
        };
        p.drain_clear.remove(&u.id);
        p.out.push(Action::ForgetUnit {
            id: u.id,
            reason,
            message,
        });
    }
    p.rec.units = kept;
}

/// 2. The layout: one manager per `layout.managers`, one dispatcher per dispatcher host, N data
///    planes (newest drained first on scale-in). Returns false when the pass cannot go on (no
///    port for the manager channel).
fn layout(p: &mut Pass, obs: &Observed, hosts: &Hosts, now: u64) -> bool {
    let layout = &p.snap.spec.spec.layout;
    let name = p.rec.name.clone();
    let mut to_start = Vec::new();
    let managers = p
        .rec
        .units
        .iter()
        .filter(|u| u.role == UnitRole::Manager)
        .count();
    // Managers elect their leader with a lock on their machine's filesystem. Where the hosts
    // share one (the lab's namespaces, this machine) they are spread over the hosts, so one
    // host's loss leaves a standby; an agent's host has a filesystem of its own, where a manager
    // on each host would lead at once (two leaders, two bucket tables): there they share one
    // host, whichever a manager already runs on, and a lost host's are replaced by the
    // management tool.
    let with = p
        .rec
        .units
        .iter()
        .find(|u| u.role == UnitRole::Manager && u.state != UnitState::Stopped)
        .and_then(|u| hosts.dataplanes.iter().position(|h| h.name == u.host));
    for k in managers..layout.managers as usize {
        let at = match (&hosts.place, with) {
            (Place::Agents, Some(i)) => i,
            (Place::Agents, None) => 0,
            _ => k % hosts.dataplanes.len(),
        };
        to_start.push((UnitRole::Manager, hosts.dataplanes[at].name.clone(), None));
    }
    let want_disp = layout.dispatchers as usize;
    let have_disp = hosts.dispatchers.len();
    if want_disp <= have_disp {
        p.clear_error("spec.layout.dispatchers");
    }
    if want_disp > have_disp {
        p.set_error(match &hosts.place {
            Place::Lab { prefix } => format!(
                "spec.layout.dispatchers is {want_disp} but lab {prefix} has {have_disp} \
                 dispatcher host(s) (`dva lab up --dispatchers {want_disp}`)"
            ),
            Place::Agents => format!(
                "spec.layout.dispatchers is {want_disp} but {have_disp} ready host(s) are \
                 labelled dispatcher=true (`dva agent --label dispatcher=true` on the machines \
                 that hold the interfaces)"
            ),
            Place::ThisMachine => format!(
                "spec.layout.dispatchers is {want_disp} but {} holds the interfaces of one \
                 dispatcher",
                hosts.describe()
            ),
        });
    }
    // Addresses of the units about to start: on one machine dispatchers and data planes share
    // the backplane address, so a data plane's ports must avoid theirs (a unit's lanes take
    // its port and the next `dispatcher_threads - 1` or `dataplane_threads - 1`).
    let runtime = &p.snap.spec.spec.runtime;
    let lanes = runtime.dispatcher_threads.unwrap_or(1).max(1);
    let dp_lanes = runtime.dataplane_threads.unwrap_or(1).max(1);
    let mut planned: Vec<(String, SocketAddr, u16)> = Vec::new();
    for host in hosts.dispatchers.iter().take(want_disp) {
        if !p
            .rec
            .units
            .iter()
            .any(|u| u.role == UnitRole::Dispatcher && u.host == host.name)
        {
            let addr = SocketAddr::new(host.backplane, BACKPLANE_PORT);
            planned.push((host.name.clone(), addr, lanes));
            to_start.push((UnitRole::Dispatcher, host.name.clone(), Some(addr)));
        }
    }
    let active: Vec<u32> = p
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
    let want = p.rec.dataplanes as usize;
    if active.len() < want {
        for _ in active.len()..want {
            let spans = Spans {
                dispatcher: lanes,
                dataplane: dp_lanes,
            };
            let (host, addr) = place_dataplane(hosts, &name, &p.rec.units, &planned, spans);
            planned.push((host.clone(), addr, dp_lanes));
            to_start.push((UnitRole::Dataplane, host, Some(addr)));
        }
    } else if active.len() > want {
        // Newest first: the longest-lived data planes hold the most flows.
        let mut ids = active.clone();
        ids.sort_unstable_by(|a, b| b.cmp(a));
        for id in ids.into_iter().take(active.len() - want) {
            if let Some(u) = p.rec.units.iter_mut().find(|u| u.id == id) {
                u.state = UnitState::Draining;
                u.draining_since_ms = Some(now);
            }
            let message = format!(
                "data plane {id} draining: no new flows, existing ones served (deadline {} ms)",
                p.rec.drain_deadline_ms
            );
            p.out.push(Action::DrainUnit {
                id,
                at: now,
                message,
            });
        }
    }
    if !to_start.is_empty() && p.rec.manager_port.is_none() {
        match obs.manager_port {
            Some(port) => {
                p.rec.manager_port = Some(port);
                p.out.push(Action::SetManagerPort(port));
            }
            None => {
                p.set_error(format!(
                    "no free port for the manager channel from {MANAGER_PORT}"
                ));
                return false;
            }
        }
    }
    let port = p.rec.manager_port.unwrap_or(MANAGER_PORT);
    for (role, host, addr) in to_start {
        let id = p.rec.next_unit_id;
        p.rec.next_unit_id += 1;
        let unit = UnitRecord {
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
        };
        let listen = (role == UnitRole::Manager)
            .then(|| manager_addr(hosts, &unit.host, port).map(|a| format!("tcp://{a}")))
            .flatten();
        p.rec.units.push(unit.clone());
        p.out.push(Action::StartUnit {
            unit,
            managers: manager_endpoints(hosts, port),
            listen,
        });
    }
    true
}

/// 3. The manager link (connected to whichever manager leads), and the desired state over it:
///    when it changed, when the link is new, and every [`DESIRED_EVERY_MS`] anyway.
fn manager_link(p: &mut Pass, obs: &Observed, hosts: &Hosts, port: u16, now: u64) {
    let mut linked = obs.link_up;
    if !obs.link_up {
        let candidates: Vec<(SocketAddr, Option<String>)> = p
            .rec
            .units
            .iter()
            .filter(|u| u.role == UnitRole::Manager && u.state != UnitState::Stopped)
            .filter_map(|u| {
                let addr = manager_addr(hosts, &u.host, port)?;
                Some((addr, hosts.netns_of(&u.host).map(str::to_string)))
            })
            .collect();
        if !candidates.is_empty() {
            p.out.push(Action::ConnectManager { candidates });
            linked = true;
        }
    }
    let desired = desired(&p.rec, &p.snap.spec);
    // A new link has sent nothing yet.
    let sent = p.snap.desired_sent.as_ref().filter(|_| obs.link_up);
    let due =
        sent.is_none_or(|(at, d)| *d != desired || now.saturating_sub(*at) >= DESIRED_EVERY_MS);
    if linked && due {
        p.out.push(Action::SendDesired(Box::new(desired)));
    }
}

/// 4. Unit states from the manager's status; draining data planes that are done get stopped.
fn unit_states(p: &mut Pass, st: &ManagerStatus, now: u64) {
    let by_id: BTreeMap<u32, &UnitStatus> = st.units.iter().map(|u| (u.id, u)).collect();
    let deadline_ms = p.rec.drain_deadline_ms;
    for u in p.rec.units.iter_mut() {
        let us = by_id.get(&u.id);
        match u.state {
            UnitState::Starting if us.is_some_and(|s| s.connected && s.acked > 0) => {
                u.state = UnitState::Ready;
                let message = format!(
                    "{} unit {} on {} serving config version {}",
                    u.role.as_str(),
                    u.id,
                    u.host,
                    us.map_or(0, |s| s.acked)
                );
                p.out.push(Action::UnitReady {
                    id: u.id,
                    message: Some(message),
                });
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
                    match p.drain_clear.get(&u.id) {
                        Some(&t) => t,
                        None => {
                            p.drain_clear.insert(u.id, now);
                            p.out.push(Action::DrainClear {
                                id: u.id,
                                since: Some(now),
                            });
                            now
                        }
                    }
                } else {
                    if p.drain_clear.remove(&u.id).is_some() {
                        p.out.push(Action::DrainClear {
                            id: u.id,
                            since: None,
                        });
                    }
                    now
                };
                let clear_ms = now.saturating_sub(clear_since);
                let past_deadline = now.saturating_sub(since) >= deadline_ms;
                let open = us
                    .and_then(|s| s.report.as_ref())
                    .map_or(0, |r| r.active_flows);
                if past_deadline && u.exporting_since_ms.is_none() && !empty {
                    // Past the deadline: hand the remaining flows to their buckets' owners
                    // instead of cutting them (the unit stops once it holds none).
                    u.exporting_since_ms = Some(now);
                    let message = format!(
                        "data plane {} passed its drain deadline with {open} open flow(s); \
                         exporting their state to the buckets' owners",
                        u.id
                    );
                    p.out.push(Action::Export {
                        id: u.id,
                        at: now,
                        message,
                    });
                    continue;
                }
                let export_overdue = u
                    .exporting_since_ms
                    .is_some_and(|t| now.saturating_sub(t) >= EXPORT_LIMIT_MS);
                let clear_for = if u.exporting_since_ms.is_some() {
                    EXPORT_CLEAR_FOR_MS
                } else {
                    DRAIN_CLEAR_FOR_MS
                };
                // An exporting unit that holds no connection at all is done (draining units
                // create none, so a zero here is final).
                let exported = u.exporting_since_ms.is_some()
                    && us.is_some_and(|s| s.report.as_ref().is_some_and(|r| r.flows == 0));
                let held = us.and_then(|s| s.report.as_ref()).map_or(0, |r| r.flows);
                if empty && clear_ms >= clear_for && held > 0 && u.exporting_since_ms.is_none() {
                    // Nothing in use here any more, but state is still held (closing
                    // connections, quiet ones, ones whose packets the owner already serves):
                    // hand it over rather than drop it.
                    u.exporting_since_ms = Some(now);
                    let message = format!(
                        "data plane {} is idle and holds {held} connection(s); exporting their \
                         state to the buckets' owners",
                        u.id
                    );
                    p.out.push(Action::Export {
                        id: u.id,
                        at: now,
                        message,
                    });
                    continue;
                }
                if (empty && clear_ms >= clear_for) || exported || export_overdue {
                    let message = if exported || (empty && u.exporting_since_ms.is_some()) {
                        let ms = now.saturating_sub(since);
                        format!(
                            "data plane {} exported its flows; stopping it ({ms} ms after it \
                             started draining)",
                            u.id
                        )
                    } else if empty {
                        format!("data plane {} holds no open flows; stopping it", u.id)
                    } else {
                        format!(
                            "data plane {} passed its drain deadline with {open} open flow(s); \
                             stopping it",
                            u.id
                        )
                    };
                    u.state = UnitState::Stopped;
                    p.out.push(Action::StopUnit {
                        id: u.id,
                        process: u.pid.map(|pid| UnitProcess {
                            pid,
                            start: u.pid_start,
                        }),
                        message,
                    });
                }
            }
            _ => {}
        }
    }
}

/// 5. The autoscaler, on the serving data planes' reports.
fn autoscale(p: &mut Pass, obs: &Observed, now: u64) {
    let (Some(policy), Some(st)) = (&p.snap.spec.spec.layout.autoscale, &obs.status) else {
        return;
    };
    let by_id: BTreeMap<u32, &UnitStatus> = st.units.iter().map(|u| (u.id, u)).collect();
    let dps: Vec<(u32, u64, f64, u64)> = p
        .rec
        .units
        .iter()
        .filter(|u| u.role == UnitRole::Dataplane && u.state == UnitState::Ready)
        .filter_map(|u| {
            let r = by_id.get(&u.id)?.report.as_ref()?;
            Some((u.id, r.rx_packets, r.cpu_percent, r.active_flows))
        })
        .collect();
    let mut autoscaler = p.snap.autoscaler.clone();
    let load = autoscaler.observe(now, &dps);
    let l = &p.snap.spec.spec.layout.dataplanes;
    let settled = p
        .rec
        .units
        .iter()
        .filter(|u| u.role == UnitRole::Dataplane && u.state == UnitState::Ready)
        .count() as u32
        == p.rec.dataplanes;
    if settled {
        if let Some(d) = autoscaler.decide(now, policy, &load, p.rec.dataplanes, l.min, l.max) {
            p.rec.dataplanes = d.target;
            p.rec.generation += 1;
            p.out.push(Action::Autoscale {
                target: d.target,
                reason: d.reason,
            });
        }
    }
    p.out.push(Action::Autoscaler(Box::new(autoscaler)));
}

/// Where a manager on `host` listens.
pub(crate) fn manager_addr(hosts: &Hosts, host: &str, port: u16) -> Option<SocketAddr> {
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

/// The data-plane host with the fewest data planes of this appliance and units of others per
/// CPU, and the next free backplane port on it. `planned`: units about to start, with the
/// ports each takes from its address on; a dispatcher takes `lanes`.
/// Backplane ports a unit of each role takes: its own and one per further lane.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Spans {
    pub dispatcher: u16,
    pub dataplane: u16,
}

pub(crate) fn place_dataplane(
    hosts: &Hosts,
    appliance: &str,
    units: &[UnitRecord],
    planned: &[(String, SocketAddr, u16)],
    spans: Spans,
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
            + planned.iter().filter(|(p, _, _)| *p == h.name).count()
            + h.running.iter().filter(|a| *a != appliance).count();
        let fewer = best.0 == usize::MAX || n * (best.1 as usize) < best.0 * (h.cpus as usize);
        if fewer {
            best = (n, h.cpus, i);
        }
    }
    let host = &hosts.dataplanes[best.2];
    let (ns, ip) = (host.name.clone(), host.backplane);
    // Port ranges taken on the host: (first, count).
    let used: Vec<(u16, u16)> = units
        .iter()
        .filter(|u| u.host == ns)
        .filter_map(|u| {
            let span = match u.role {
                UnitRole::Dispatcher => spans.dispatcher,
                UnitRole::Dataplane => spans.dataplane,
                _ => 1,
            };
            u.addr.map(|a| (a.port(), span))
        })
        .chain(
            planned
                .iter()
                .filter(|(h, _, _)| *h == ns)
                .map(|(_, a, span)| (a.port(), *span)),
        )
        .collect();
    let taken = |p: u16| {
        used.iter()
            .any(|&(first, n)| p >= first && u32::from(p) < u32::from(first) + u32::from(n))
    };
    // Every lane's port free: the first of a run of `spans.dataplane` untaken ports.
    let free_run =
        |first: u16| (0..spans.dataplane).all(|i| first.checked_add(i).is_some_and(|p| !taken(p)));
    let port = (BACKPLANE_PORT..u16::MAX)
        .find(|p| free_run(*p))
        .unwrap_or(BACKPLANE_PORT);
    (ns, SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use dva_proto::channel::UnitReport;

    const NOW: u64 = 1_000_000;

    fn host(name: &str, cpus: u32, running: &[&str]) -> Host {
        Host {
            name: name.into(),
            backplane: IpAddr::from([198, 19, 0, 2]),
            netns: None,
            cpus,
            running: running.iter().map(|s| s.to_string()).collect(),
            labels: BTreeMap::new(),
        }
    }

    /// Data planes go where fewest units run per CPU, other appliances' units counted.
    #[test]
    fn data_planes_go_to_free_capacity() {
        let hosts = Hosts {
            dispatchers: Vec::new(),
            dataplanes: vec![host("a", 1, &["other"]), host("b", 2, &[])],
            managers: Vec::new(),
            place: Place::Agents,
            upstream: false,
        };
        let mut planned = Vec::new();
        let mut placed = Vec::new();
        for _ in 0..4 {
            let (h, addr) = place_dataplane(&hosts, "edge-fw", &[], &planned, spans(1, 1));
            planned.push((h.clone(), addr, 1));
            placed.push(h);
        }
        // b (2 CPUs, empty) takes two before a (1 CPU, one unit of another appliance) takes one.
        assert_eq!(placed, ["b", "b", "a", "b"]);
        // Ports on one host do not collide.
        let ports: Vec<u16> = planned
            .iter()
            .filter(|(h, _, _)| h == "b")
            .map(|(_, a, _)| a.port())
            .collect();
        assert_eq!(
            ports,
            [BACKPLANE_PORT, BACKPLANE_PORT + 1, BACKPLANE_PORT + 2]
        );
        // A dispatcher with 4 lanes on the host: its ports and the 3 after it are taken.
        let disp = SocketAddr::new(hosts.dataplanes[1].backplane, BACKPLANE_PORT);
        let (_, addr) = place_dataplane(
            &hosts,
            "edge-fw",
            &[],
            &[("b".into(), disp, 4)],
            spans(4, 1),
        );
        assert_eq!(addr.port(), BACKPLANE_PORT + 4);
        // Data planes of 2 lanes each: each takes two ports, none overlapping another's or the
        // dispatcher's 2 (a single free port between them is skipped).
        let mut planned = vec![("b".to_string(), disp, 2)];
        let gap = SocketAddr::new(disp.ip(), BACKPLANE_PORT + 3);
        planned.push(("b".into(), gap, 2));
        let only_b = Hosts {
            dataplanes: vec![hosts.dataplanes[1].clone()],
            ..hosts
        };
        let (_, addr) = place_dataplane(&only_b, "edge-fw", &[], &planned, spans(2, 2));
        assert_eq!(
            addr.port(),
            BACKPLANE_PORT + 5,
            "port +2 alone is too narrow"
        );
    }

    fn spans(dispatcher: u16, dataplane: u16) -> Spans {
        Spans {
            dispatcher,
            dataplane,
        }
    }

    /// Agents' hosts: `disp` holds the interfaces, `h1` and `h2` run managers and data planes.
    fn agents() -> Hosts {
        let h = |name: &str, last: u8| Host {
            name: name.into(),
            backplane: IpAddr::from([198, 19, 0, last]),
            netns: None,
            cpus: 1,
            running: Vec::new(),
            labels: BTreeMap::new(),
        };
        Hosts {
            dispatchers: vec![h("disp", 1)],
            dataplanes: vec![h("h1", 2), h("h2", 3)],
            managers: vec![h("h1", 2), h("h2", 3)],
            place: Place::Agents,
            upstream: false,
        }
    }

    fn spec(dataplanes: u32) -> ApplianceSpec {
        let text = format!(
            "apiVersion: dva/v1\nkind: Appliance\nmetadata:\n  name: fw\nspec:\n  interfaces:\n    \
             - {{ name: outside, device: out0, addresses: [198.18.3.1/24] }}\n    \
             - {{ name: inside, device: in0, addresses: [198.18.4.1/24] }}\n  layout:\n    \
             dataplanes: {{ min: 1, initial: {dataplanes}, max: 8 }}\n  services:\n    \
             - firewall: {{ default: drop }}\n"
        );
        ApplianceSpec::from_yaml(&text).expect("test spec")
    }

    fn unit(id: u32, role: UnitRole, host: &str, port: u16, state: UnitState) -> UnitRecord {
        let last = match host {
            "disp" => 1,
            "h1" => 2,
            _ => 3,
        };
        UnitRecord {
            id,
            role,
            host: host.into(),
            pid: Some(100 + id),
            pid_start: Some(7),
            addr: (role != UnitRole::Manager)
                .then(|| SocketAddr::new(IpAddr::from([198, 19, 0, last]), port)),
            state,
            started_ms: 0,
            draining_since_ms: None,
            exporting_since_ms: None,
        }
    }

    /// A serving appliance: manager 1 on h1, dispatcher 2, data planes 3..=2+n spread over h1, h2.
    fn serving(n: u32) -> (Snapshot, Observed) {
        use UnitRole::*;
        let mut units = vec![
            unit(1, Manager, "h1", 0, UnitState::Ready),
            unit(2, Dispatcher, "disp", BACKPLANE_PORT, UnitState::Ready),
        ];
        for k in 0..n {
            let host = if k % 2 == 0 { "h1" } else { "h2" };
            let port = BACKPLANE_PORT + (k / 2) as u16;
            units.push(unit(3 + k, Dataplane, host, port, UnitState::Ready));
        }
        let rec = ApplianceRecord {
            name: "fw".into(),
            spec_text: String::new(),
            generation: 1,
            dataplanes: n,
            drain_deadline_ms: 30_000,
            next_unit_id: 3 + n,
            units,
            events: Vec::new(),
            created_ms: 0,
            manager_port: Some(MANAGER_PORT),
        };
        let spec = spec(n);
        let sent = desired(&rec, &spec);
        let status = ManagerStatus {
            generation: 1,
            version: 4,
            converged: true,
            error: None,
            units: rec
                .units
                .iter()
                .filter(|u| u.role != Manager)
                .map(|u| UnitStatus {
                    id: u.id,
                    connected: true,
                    acked: 4,
                    nack: None,
                    report: Some(UnitReport {
                        version: 4,
                        active_flows: 10,
                        flows: 10,
                        ..Default::default()
                    }),
                    buckets: if u.role == Dataplane { 4096 / n } else { 0 },
                    history_buckets: 0,
                })
                .collect(),
            leader: 1,
        };
        let snap = Snapshot {
            rec,
            spec,
            error: None,
            drain_clear: BTreeMap::new(),
            autoscaler: Autoscaler::default(),
            ecmp: Vec::new(),
            desired_sent: Some((NOW - 100, sent)),
        };
        let obs = Observed {
            status: Some(status),
            link_up: true,
            lost_after_ms: 3000,
            ..Observed::default()
        };
        (snap, obs)
    }

    /// Each action by name, with the unit it is about: a pass as a line of text.
    fn summary(actions: &[Action]) -> Vec<String> {
        actions
            .iter()
            .map(|a| match a {
                Action::ForgetUnit { id, reason, .. } => format!("forget {id} ({reason})"),
                Action::StopDuplicate { process, .. } => format!("stop-duplicate {}", process.pid),
                Action::Adopt { id, process, .. } => format!("adopt {id} pid {}", process.pid),
                Action::SetError(e) => format!("error {e}"),
                Action::ClearError(p) => format!("clear-error {p}"),
                Action::SetManagerPort(p) => format!("manager-port {p}"),
                Action::StartUnit { unit, .. } => {
                    format!("start {} {} on {}", unit.role.as_str(), unit.id, unit.host)
                }
                Action::DrainUnit { id, .. } => format!("drain {id}"),
                Action::ConnectManager { candidates } => format!("connect {}", candidates.len()),
                Action::SendDesired(d) => {
                    let ids: Vec<String> = d
                        .units
                        .iter()
                        .map(|u| format!("{}{}", u.id, if u.draining { "d" } else { "" }))
                        .collect();
                    format!("desired [{}]", ids.join(","))
                }
                Action::UnitReady { id, .. } => format!("ready {id}"),
                Action::Export { id, .. } => format!("export {id}"),
                Action::StopUnit { id, .. } => format!("stop {id}"),
                Action::DrainClear { id, since } => format!("drain-clear {id} {since:?}"),
                Action::Autoscale { target, .. } => format!("autoscale {target}"),
                Action::Autoscaler(_) => "autoscaler".into(),
                Action::SetEcmp(v) => format!("ecmp {v:?}"),
            })
            .collect()
    }

    fn run(snap: &Snapshot, obs: &Observed) -> Vec<String> {
        summary(&plan(snap, obs, &agents(), NOW))
    }

    /// Each case: a change to a serving appliance with 2 data planes, and the pass it plans.
    #[test]
    fn passes_as_data() {
        type Change = fn(&mut Snapshot, &mut Observed, &mut Hosts);
        let cases: &[(&str, Change, &[&str])] = &[
            (
                "nothing to do when observed matches desired",
                |_, _, _| {},
                &[],
            ),
            (
                "a dead data plane is replaced on the emptiest host",
                |_, o, _| {
                    o.units.insert(4, Liveness::Gone);
                },
                &[
                    "forget 4 (unit-died)",
                    "start dataplane 5 on h2",
                    "desired [2,3,5]",
                ],
            ),
            (
                "the spec's host selector keeps a replacement on the hosts with its labels",
                |s, o, h| {
                    o.units.insert(4, Liveness::Gone);
                    let zone = |h: &mut Host, z: &str| {
                        h.labels.insert("zone".into(), z.into());
                    };
                    zone(&mut h.dispatchers[0], "a");
                    zone(&mut h.dataplanes[0], "a");
                    zone(&mut h.dataplanes[1], "b");
                    s.spec
                        .spec
                        .layout
                        .host_selector
                        .insert("zone".into(), "a".into());
                },
                &[
                    "forget 4 (unit-died)",
                    "start dataplane 5 on h1",
                    "desired [2,3,5]",
                ],
            ),
            (
                "a host selector no ready host matches is the pass's error",
                |s, o, _| {
                    o.units.insert(4, Liveness::Gone);
                    s.spec
                        .spec
                        .layout
                        .host_selector
                        .insert("zone".into(), "c".into());
                },
                &[
                    "forget 4 (unit-died)",
                    "error no ready host for data planes and managers carries every label \
                     spec.layout.host_selector asks for (zone=c); `dva get hosts` shows the \
                     labels (`dva agent --label`)",
                ],
            ),
            (
                "a lost host's data plane is replaced on a ready one",
                |_, o, h| {
                    o.units.insert(4, Liveness::Gone);
                    o.lost_hosts.insert("h2".into());
                    // The registry leaves a lost host out of those that take units.
                    h.dataplanes.retain(|h| h.name != "h2");
                },
                &[
                    "forget 4 (unit-died)",
                    "start dataplane 5 on h1",
                    "desired [2,3,5]",
                ],
            ),
            (
                "scale 2 -> 3 starts one data plane and sends the new table's units",
                |s, _, _| s.rec.dataplanes = 3,
                &["start dataplane 5 on h1", "desired [2,3,4,5]"],
            ),
            (
                "scale 2 -> 1 drains the newest, stops nothing yet",
                |s, _, _| s.rec.dataplanes = 1,
                &["drain 4", "desired [2,3,4d]"],
            ),
            (
                "a dead manager is replaced and the link to it reconnected",
                |_, o, _| {
                    o.units.insert(1, Liveness::Gone);
                    o.link_up = false;
                    o.status = None;
                },
                &[
                    "forget 1 (unit-died)",
                    "start manager 5 on h1",
                    "connect 1",
                    "desired [2,3,4]",
                ],
            ),
            (
                "a unit found running after a crash is adopted, its duplicate stopped",
                |_, o, _| {
                    let p = |pid| UnitProcess {
                        pid,
                        start: Some(9),
                    };
                    o.units.insert(
                        3,
                        Liveness::Found {
                            first: p(200),
                            duplicates: vec![p(201)],
                        },
                    );
                },
                &["stop-duplicate 201", "adopt 3 pid 200"],
            ),
            (
                "the desired state is sent again once a second",
                |s, _, _| {
                    if let Some((at, _)) = s.desired_sent.as_mut() {
                        *at = NOW - DESIRED_EVERY_MS;
                    }
                },
                &["desired [2,3,4]"],
            ),
            (
                "a starting data plane that acked its config is ready",
                |s, _, _| s.rec.units[3].state = UnitState::Starting,
                &["ready 4"],
            ),
        ];
        for (what, change, want) in cases {
            let (mut snap, mut obs) = serving(2);
            let mut hosts = agents();
            change(&mut snap, &mut obs, &mut hosts);
            assert_eq!(summary(&plan(&snap, &obs, &hosts, NOW)), *want, "{what}");
        }
    }

    /// Scale-in drains before it stops: a draining data plane is stopped only once it has looked
    /// empty for a second.
    #[test]
    fn scale_in_drains_then_stops() {
        let (mut snap, mut obs) = serving(3);
        snap.rec.dataplanes = 2;
        let actions = plan(&snap, &obs, &agents(), NOW);
        assert_eq!(summary(&actions), ["drain 5", "desired [2,3,4,5d]"]);

        // The manager moved its buckets away and it holds no flows any more.
        let u = snap
            .rec
            .units
            .iter_mut()
            .find(|u| u.id == 5)
            .expect("unit 5");
        u.state = UnitState::Draining;
        u.draining_since_ms = Some(NOW);
        let sent = desired(&snap.rec, &snap.spec);
        // Sent as late as the last step below: this test is about the drain alone.
        snap.desired_sent = Some((NOW + 1200, sent));
        let st = obs.status.as_mut().expect("status");
        let s5 = st.units.iter_mut().find(|s| s.id == 5).expect("status 5");
        s5.buckets = 0;
        s5.report = Some(UnitReport {
            version: 4,
            ..Default::default()
        });
        let at = NOW + 200;
        assert_eq!(
            summary(&plan(&snap, &obs, &agents(), at)),
            [format!("drain-clear 5 Some({at})")]
        );
        snap.drain_clear.insert(5, at);
        // Not yet a second.
        assert!(plan(&snap, &obs, &agents(), at + 999).is_empty());
        let stop = plan(&snap, &obs, &agents(), at + 1000);
        assert_eq!(summary(&stop), ["stop 5"]);
        let Action::StopUnit { process, .. } = &stop[0] else {
            unreachable!()
        };
        assert_eq!(process.map(|p| p.pid), Some(105));
    }

    /// Past its deadline with flows still open, a draining data plane exports them first.
    #[test]
    fn past_the_deadline_flows_are_exported() {
        let (mut snap, obs) = serving(2);
        let u = snap
            .rec
            .units
            .iter_mut()
            .find(|u| u.id == 4)
            .expect("unit 4");
        u.state = UnitState::Draining;
        u.draining_since_ms = Some(NOW - 30_000);
        snap.rec.dataplanes = 1;
        let sent = desired(&snap.rec, &snap.spec);
        snap.desired_sent = Some((NOW, sent));
        assert_eq!(run(&snap, &obs), ["export 4"]);
    }

    /// With no host ready, nothing is placed and the appliance says why.
    #[test]
    fn no_ready_host() {
        let (snap, obs) = serving(2);
        let mut hosts = agents();
        hosts.dataplanes.clear();
        let actions = summary(&plan(&snap, &obs, &hosts, NOW));
        assert_eq!(actions.len(), 1);
        assert!(actions[0].starts_with("error no ready host"), "{actions:?}");
        // ... and the error goes once a host is back.
        let mut snap = snap;
        snap.error = Some("no ready host for data planes".into());
        assert_eq!(run(&snap, &obs), ["clear-error no ready host"]);
    }

    /// Upstream routers follow the dispatchers that serve: once one is ready, they point at it.
    #[test]
    fn upstream_routes_follow_serving_dispatchers() {
        let (snap, obs) = serving(2);
        let mut hosts = agents();
        let mut second = hosts.dispatchers[0].clone();
        second.name = "disp2".into();
        hosts.dispatchers.push(second);
        hosts.upstream = true;
        assert_eq!(summary(&plan(&snap, &obs, &hosts, NOW)), ["ecmp [1]"]);
        let mut snap = snap;
        snap.ecmp = vec![1];
        assert!(plan(&snap, &obs, &hosts, NOW).is_empty());
    }

    /// The same inputs give the same pass.
    #[test]
    fn plans_are_deterministic() {
        let (mut snap, mut obs) = serving(2);
        snap.rec.dataplanes = 4;
        obs.units.insert(1, Liveness::Gone);
        obs.link_up = false;
        let a = summary(&plan(&snap, &obs, &agents(), NOW));
        let b = summary(&plan(&snap, &obs, &agents(), NOW));
        assert_eq!(a, b);
        assert!(a.len() > 3, "{a:?}");
    }
}
