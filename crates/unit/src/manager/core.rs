//! The manager's state machine, without I/O: [`State::handle`] takes the time and one
//! [`Input`] (a connection opened or closed, a message on one, a tick) and queues [`Output`]s (a
//! message to write on a connection, a connection to close) that [`State::drain_outputs`] hands
//! to the run loop, which owns the sockets. It never reads a clock nor touches a socket, so
//! every protocol it runs (roll-out, failover, history retirement, adoption after a restart)
//! is tested as data (see `conformance`).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use dva_flow::{BucketTable, UnitId};
use dva_proto::channel::{
    Desired, DesiredRole, FromManager, ManagerStatus, ToManager, UnitReport, UnitStatus,
};
use dva_proto::role::{BackendStateConfig, BackplaneAuth, BackplaneKey};
use dva_proto::{compile, Placement, RoleConfig, UnitEndpoint};
use dva_services::lb::BackendState;

use crate::stats::{Histogram, Latencies, CONFIG_ACK_BOUNDS, TABLE_SWITCH_BOUNDS};
use crate::tls::Peer;

/// Dispatchers get a new table once every data plane ACKed it, or after this long.
const DATAPLANE_ACK_TIMEOUT: Duration = Duration::from_secs(3);
/// A config not ACKed or NACKed within this long is sent again.
const RESEND_AFTER: Duration = Duration::from_secs(5);
const STATUS_EVERY: Duration = Duration::from_millis(500);
const RETIRE_EVERY: Duration = Duration::from_millis(500);
/// Reports must be this much younger than the dispatchers' switch before they can retire history.
const RETIRE_SETTLE: Duration = Duration::from_millis(600);

/// A channel connection, numbered by the run loop (never reused).
pub type ConnId = u64;

/// What happens to the manager.
#[derive(Debug)]
pub enum Input {
    /// A connection finished its TLS handshake; its certificate names `Peer`.
    Opened(ConnId, Peer),
    /// A message came on a connection.
    Msg(ConnId, Box<ToManager>),
    /// A connection ended (its peer closed it, it broke, or a write on it failed).
    Closed(ConnId),
    /// Time passed (the run loop ticks at least every 50 ms): the table, keys and configs are
    /// brought up to date, pushed, and the status and keepalives sent when due.
    Tick,
}

/// What the manager asks of the run loop, in order.
#[derive(Debug)]
pub enum Output {
    /// Write this message on the connection.
    Send(ConnId, FromManager),
    /// Shut the connection down: its peer said what it may not (see [`may_send`]), counted as
    /// `channel_peer_refused` with this reason.
    Close(ConnId, String),
}

/// Whether `peer` may send `msg`: a unit speaks only for the unit its certificate names, and
/// only the management tool sets the desired state.
pub fn may_send(peer: &Peer, msg: &ToManager) -> Result<(), String> {
    match (peer, msg) {
        (Peer::Unit { id, .. }, ToManager::Hello { unit, .. }) if unit != id => Err(format!(
            "the certificate names unit {id} but the hello claims unit {unit}"
        )),
        (Peer::Unit { id, .. }, ToManager::Desired(_)) => {
            Err(format!("unit {id} sent desired state"))
        }
        (Peer::Mgmt, ToManager::Hello { unit, .. }) => Err(format!(
            "the management tool's certificate sent a hello for unit {unit}"
        )),
        _ => Ok(()),
    }
}

#[derive(Default)]
struct UnitConn {
    conn: Option<ConnId>,
    role: String,
    acked: u64,
    sent: u64,
    sent_at: Option<Instant>,
    /// The version last sent on this connection and when it was *first* sent: a resend keeps
    /// the time, so the ACK latency includes the wait that made the resend necessary.
    first_sent: Option<(u64, Instant)>,
    nonce: u64,
    nack: Option<(u64, String)>,
    report: Option<(Instant, UnitReport)>,
}

/// One leading manager: the desired state, the bucket table, each unit's session (what it was
/// sent, what it ACKed, its last report), the keys, and the outputs not yet drained.
#[derive(Default)]
pub struct State {
    desired: Option<Desired>,
    version: u64,
    table: Option<BucketTable>,
    /// The version that last changed bucket ownership, and when every dispatcher ACKed it.
    table_version: u64,
    dispatchers_switched: Option<Instant>,
    /// When `table_version` was first pushed (to the data planes), while dispatchers have not
    /// all switched to it yet.
    table_sent: Option<Instant>,
    latency: ManagerLatency,
    /// Where each input of a compiled config stands now, and where it stood when the current
    /// version was compiled: a version is compiled when they differ.
    revs: Revisions,
    compiled_from: Option<Revisions>,
    /// Load-balancer backends the dispatchers find down (see [`State::backends_down`]).
    down: Vec<(String, String)>,
    /// Data planes fenced at the dispatchers: silent, or failed over and not rejoined yet.
    fenced: Vec<UnitId>,
    configs: BTreeMap<UnitId, RoleConfig>,
    /// Version released to dispatchers (DPs ACKed it or the timeout passed).
    released: u64,
    units: BTreeMap<UnitId, UnitConn>,
    /// Open connections and who their certificates name.
    peers: BTreeMap<ConnId, Peer>,
    /// Connections of the management tool (they sent desired state): they get the status.
    controllers: BTreeSet<ConnId>,
    /// What the run loop is to write, in order (see [`State::drain_outputs`]).
    outputs: Vec<Output>,
    error: Option<String>,
    next_nonce: u64,
    last_status: Option<Instant>,
    last_retire: Option<Instant>,
    last_alive: Option<Instant>,
    /// Newest running config a unit told us about in its hello (adopted after a manager restart).
    adopted: Option<(u64, BucketTable)>,
    /// The backups data planes ran under a table (its epoch), heard in their hellos: adopted
    /// with a table of that epoch (see [`Running::backups`]).
    adopted_backups: Option<(u64, Vec<UnitId>)>,
    /// When this manager adopted the units' table: membership is left alone for a while after,
    /// as units reconnect one by one (see [`SETTLE_AFTER_START`]).
    adopted_at: Option<Instant>,
    /// The epoch of the adopted table whose backups came with it (kept while it lasts).
    adopted_backups_for: Option<u64>,
    /// The backplane keys units hold, heard in their hellos: a manager that takes over goes on
    /// with the newest rather than cutting every unit off from its peers with a fresh key.
    adopted_keys: Option<BackplaneAuth>,
    /// The backplane keys handed to every unit, and when they last rotated.
    keys: Option<(BackplaneAuth, Instant)>,
    dirty: bool,
    born: Option<Instant>,
    /// This manager's unit id (it leads).
    me: UnitId,
    /// Data planes whose reports stopped (see [`SILENT_AFTER`]): out of the bucket table, sent
    /// nothing, not waited for, until they report again.
    silent: BTreeSet<UnitId>,
    /// Data planes failed over while silent, and the config version that took their buckets:
    /// one that reports again owns nothing until it has ACKed that version, which drops the
    /// copies it still holds of its old buckets (they went stale while others served them).
    rejoin_after: BTreeMap<UnitId, u64>,
    /// The backups of the current table as handed to the data planes: where each bucket's state
    /// is being replicated, so where a leaving owner's buckets must go. Kept rather than
    /// recomputed at failover, when a dead unit's host may no longer be in the desired state.
    backups: Vec<UnitId>,
    /// Each data plane's machine, kept while it is in the table: a dead unit leaves the desired
    /// state before its buckets leave it, and the backups compiled meanwhile must still be
    /// chosen knowing where it ran (else they change under the replicas already made).
    hosts: BTreeMap<UnitId, String>,
}

/// Revisions of what a version's configs are compiled from. Each part is bumped where it
/// changes, so noticing that a new version is needed costs a comparison of five numbers, not a
/// look at the table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Revisions {
    /// The desired state's part that configs are made from ([`compiled_part`]): a new spec
    /// generation, units added or removed, an address or export flag changed.
    desired: u64,
    /// Every change of the bucket table: owners (a new epoch) or history (retired entries,
    /// which leave the epoch alone).
    table: u64,
    /// The backplane keys' send epoch (it moves at each rotation).
    keys: u32,
    /// The set of load-balancer backends found down (dispatchers' reports change it).
    backends: u64,
    /// The set of fenced data planes.
    fenced: u64,
}

/// What of the desired state reaches the configs: the spec (named by its generation) and each
/// unit's role, address and export flag. Draining moves buckets, which changes the table; a
/// unit's host only steers where backups go, taken up by the next version compiled anyway.
fn compiled_part(d: &Desired) -> (u64, Vec<(UnitId, DesiredRole, std::net::SocketAddr, bool)>) {
    let units = d.units.iter().map(|u| (u.id, u.role, u.addr, u.export));
    (d.generation, units.collect())
}

/// What the manager measures, published in its stats ([`Latencies`]).
struct ManagerLatency {
    /// Config push to ACK, by the role of the unit that ACKed.
    config_ack: [(&'static str, Histogram); 2],
    table_switch: Histogram,
}

impl Default for ManagerLatency {
    fn default() -> Self {
        ManagerLatency {
            config_ack: [
                ("dispatcher", Histogram::new(CONFIG_ACK_BOUNDS)),
                ("dataplane", Histogram::new(CONFIG_ACK_BOUNDS)),
            ],
            table_switch: Histogram::new(TABLE_SWITCH_BOUNDS),
        }
    }
}

impl ManagerLatency {
    /// An ACK `took` this long from the first send, from a unit that said it has `role`; other
    /// roles (a manager never gets configs) are not recorded, keeping the label set closed.
    fn acked(&mut self, role: &str, took: Duration) {
        if let Some((_, h)) = self.config_ack.iter_mut().find(|(r, _)| *r == role) {
            h.observe(took);
        }
    }

    fn snapshot(&self) -> Latencies {
        Latencies {
            config_ack: self
                .config_ack
                .iter()
                .map(|(role, h)| (role.to_string(), h.clone()))
                .collect(),
            table_switch: Some(self.table_switch.clone()),
            handover: None,
        }
    }
}

/// A data plane that has reported before and then says nothing for this long is taken out of
/// the bucket table: its buckets go to their backups, which hold their flows' state. Units report
/// every 250 ms from a thread of their own that does nothing else, so this is three reports
/// missed. A process that dies closes its connection and the management tool replaces it; this
/// is for what closes nothing: a machine that lost power or its link (TCP would notice after
/// [`super::IDLE_TIMEOUT`]; the management tool declares a host lost after seconds), where every
/// second of waiting is a second of black-holed flows.
const SILENT_AFTER: Duration = Duration::from_millis(800);
/// Once one data plane of a machine is silent, others there whose last report is older than this
/// go with it: they stopped at the same moment (the machine or its link did), a report interval
/// apart at most, and failing them over together moves each bucket once, to the backup its owner
/// replicated to, instead of rebuilding the backups between two partial failovers.
const SILENT_BESIDE: Duration = Duration::from_millis(2 * dva_proto::channel::REPORT_INTERVAL_MS);

/// After a (re)start, units reconnect one by one: the table's membership is left alone this long
/// so a restart does not look like every data plane leaving.
const SETTLE_AFTER_START: Duration = Duration::from_secs(3);

/// How long a manager waits for every dispatcher's hello before it makes the first bucket table
/// without them (one that died with its machine never says hello).
const FIRST_TABLE_WAIT: Duration = Duration::from_secs(10);

/// How long a backplane key seals datagrams before the next one takes over.
const KEY_ROTATION: Duration = Duration::from_secs(15 * 60);

impl State {
    /// A manager that leads as unit `me`, knowing nothing yet.
    pub fn new(me: UnitId) -> State {
        State {
            me,
            ..State::default()
        }
    }

    /// Take one input at `now`; what it calls for is queued for [`State::drain_outputs`].
    pub fn handle(&mut self, now: Instant, input: Input) {
        match input {
            Input::Opened(id, peer) => {
                self.peers.insert(id, peer);
            }
            Input::Closed(id) => self.closed(id),
            Input::Msg(id, msg) => {
                // A connection refused (or closed) already: what its reader still had is moot.
                let Some(peer) = self.peers.get(&id) else {
                    return;
                };
                if let Err(why) = may_send(peer, &msg) {
                    self.closed(id);
                    self.outputs.push(Output::Close(id, why));
                    return;
                }
                self.on_msg(now, id, *msg);
            }
            Input::Tick => {
                self.step(now);
                self.keepalive(now);
            }
        }
    }

    /// What to write and close, in the order it was decided.
    pub fn drain_outputs(&mut self) -> impl Iterator<Item = Output> + '_ {
        self.outputs.drain(..)
    }

    /// The newest config version compiled (0: none yet).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Config push latencies so far.
    pub fn latency(&self) -> Latencies {
        self.latency.snapshot()
    }

    /// The appliance's name, once the management tool has said.
    pub fn appliance(&self) -> Option<&str> {
        self.desired.as_ref().map(|d| d.spec.name())
    }

    #[cfg(test)]
    pub(super) fn table(&self) -> Option<&BucketTable> {
        self.table.as_ref()
    }

    /// Each bucket's backup, as handed to the data planes.
    #[cfg(test)]
    pub(super) fn backups(&self) -> &[UnitId] {
        &self.backups
    }

    #[cfg(test)]
    pub(super) fn silent(&self) -> Vec<UnitId> {
        self.silent.iter().copied().collect()
    }

    fn closed(&mut self, id: ConnId) {
        self.peers.remove(&id);
        self.controllers.remove(&id);
        for u in self.units.values_mut() {
            if u.conn == Some(id) {
                u.conn = None;
            }
        }
        self.dirty = true;
        self.refresh_backends();
    }

    fn unit_of(&self, conn: ConnId) -> Option<UnitId> {
        self.units
            .iter()
            .find(|(_, u)| u.conn == Some(conn))
            .map(|(id, _)| *id)
    }

    fn on_msg(&mut self, now: Instant, conn: ConnId, msg: ToManager) {
        match msg {
            ToManager::Hello {
                unit,
                role,
                pid: _,
                running,
            } => {
                let u = self.units.entry(unit).or_default();
                u.conn = Some(conn);
                u.role = role;
                // It may already run a config (we restarted, or it reconnected): resend only if older.
                u.acked = running.as_ref().map_or(0, |r| r.version);
                u.sent = u.acked;
                u.sent_at = None;
                // A new session: what was sent on the old one is not waited for any more (the
                // time the unit was away would measure its outage, not the push).
                u.first_sent = None;
                if let Some(r) = running {
                    if r.backplane.check().is_ok()
                        && self.keys.is_none()
                        && self
                            .adopted_keys
                            .as_ref()
                            .is_none_or(|k| r.backplane.send_epoch > k.send_epoch)
                    {
                        self.adopted_keys = Some(r.backplane.clone());
                    }
                    if self.table.is_none()
                        && !r.backups.is_empty()
                        && self
                            .adopted_backups
                            .as_ref()
                            .is_none_or(|(e, _)| r.table.epoch() > *e)
                    {
                        self.adopted_backups = Some((r.table.epoch(), r.backups.clone()));
                    }
                    // The table was adopted from a dispatcher before any data plane said hello:
                    // the backups they replicated to under it arrive now, and are where a dead
                    // owner's buckets must go (recomputed here, they would depend on hosts this
                    // manager may never have been told: those of the dead).
                    if let Some(t) = &self.table {
                        if self.adopted_at.is_some()
                            && self.adopted_backups_for.is_none()
                            && r.table.epoch() == t.epoch()
                            && r.backups.len() == t.len()
                        {
                            self.backups = r.backups.clone();
                            self.adopted_backups_for = Some(t.epoch());
                        }
                    }
                    if self.table.is_none()
                        && self.adopted.as_ref().is_none_or(|(v, _)| r.version > *v)
                    {
                        self.adopted = Some((r.version, r.table));
                    }
                }
                self.dirty = true;
            }
            ToManager::Ack { version, nonce } => {
                let Some(id) = self.unit_of(conn) else { return };
                if let Some(u) = self.units.get_mut(&id) {
                    if nonce == u.nonce && version > u.acked {
                        u.acked = version;
                        u.nack = None;
                        // Only the first ACK of a send counts: `first_sent` goes with it.
                        if let Some((_, at)) = u.first_sent.take_if(|(v, _)| *v == version) {
                            self.latency
                                .acked(&u.role, now.saturating_duration_since(at));
                        }
                    }
                }
                self.dirty = true;
            }
            ToManager::Nack {
                version,
                nonce,
                error,
            } => {
                let Some(id) = self.unit_of(conn) else { return };
                if let Some(u) = self.units.get_mut(&id) {
                    if nonce == u.nonce {
                        u.nack = Some((version, error));
                    }
                }
                self.dirty = true;
            }
            ToManager::Report(r) => {
                let Some(id) = self.unit_of(conn) else { return };
                if let Some(u) = self.units.get_mut(&id) {
                    u.report = Some((now, r));
                }
            }
            ToManager::Desired(d) => {
                self.controllers.insert(conn);
                let members = self.table.as_ref().map(|t| t.members()).unwrap_or_default();
                self.hosts.retain(|id, _| members.contains(id));
                for u in &d.units {
                    if let Some(h) = &u.host {
                        self.hosts.insert(u.id, h.clone());
                    }
                }
                self.set_desired(*d);
            }
        }
        self.refresh_backends();
    }

    fn set_desired(&mut self, d: Desired) {
        if self.desired.as_ref() == Some(&d) {
            return;
        }
        if self.desired.as_ref().map(compiled_part) != Some(compiled_part(&d)) {
            self.revs.desired += 1;
        }
        self.desired = Some(d);
        self.dirty = true;
    }

    /// Every change of the bucket table goes through here, so that it is compiled.
    fn set_table(&mut self, t: BucketTable) {
        self.table = Some(t);
        self.revs.table += 1;
    }

    fn refresh_backends(&mut self) {
        let down = self.backends_down();
        if down != self.down {
            self.down = down;
            self.revs.backends += 1;
        }
    }

    /// Silent data planes and those failed over until they rejoin: the dispatchers let nothing
    /// they send out.
    fn refresh_fenced(&mut self) {
        let fenced: BTreeSet<UnitId> = self
            .silent
            .iter()
            .chain(self.rejoin_after.keys())
            .copied()
            .collect();
        let fenced: Vec<UnitId> = fenced.into_iter().collect();
        if fenced != self.fenced {
            self.fenced = fenced;
            self.revs.fenced += 1;
        }
    }

    fn desired_units(&self, role: DesiredRole) -> Vec<&dva_proto::channel::DesiredUnit> {
        self.desired
            .as_ref()
            .map(|d| d.units.iter().filter(|u| u.role == role).collect())
            .unwrap_or_default()
    }

    fn connected(&self, id: UnitId) -> bool {
        self.units.get(&id).is_some_and(|u| u.conn.is_some())
    }

    fn step(&mut self, now: Instant) {
        if self.desired.is_some() {
            self.update_table(now);
            if let Err(e) = self.rotate_keys(now) {
                self.error = Some(e);
                return;
            }
            self.recompile();
            self.push(now);
        }
        let status_due = self
            .last_status
            .is_none_or(|t| now.duration_since(t) >= STATUS_EVERY);
        if self.dirty || status_due {
            self.dirty = false;
            self.last_status = Some(now);
            self.send_status();
        }
    }

    /// Recompute [`State::silent`]: data planes whose last report is [`SILENT_AFTER`] old, and
    /// with each of them the others on its machine whose last report is [`SILENT_BESIDE`] old.
    /// One that never reported is not silent (it is starting, or we are): readiness waits for
    /// its ACK anyway.
    fn find_silent(&mut self, now: Instant) {
        let age = |id: &UnitId| {
            self.units
                .get(id)
                .and_then(|u| u.report.as_ref())
                .map(|(at, _)| now.saturating_duration_since(*at))
        };
        let dps: Vec<(UnitId, Option<String>)> = self
            .desired_units(DesiredRole::Dataplane)
            .iter()
            .map(|u| (u.id, u.host.clone()))
            .collect();
        let mut silent: BTreeSet<UnitId> = dps
            .iter()
            .filter(|(id, _)| age(id).is_some_and(|a| a >= SILENT_AFTER))
            .map(|(id, _)| *id)
            .collect();
        let machines: BTreeSet<&String> = dps
            .iter()
            .filter(|(id, _)| silent.contains(id))
            .filter_map(|(_, h)| h.as_ref())
            .collect();
        for (id, host) in &dps {
            if host.as_ref().is_some_and(|h| machines.contains(h))
                && age(id).is_some_and(|a| a >= SILENT_BESIDE)
            {
                silent.insert(*id);
            }
        }
        for id in silent.difference(&self.silent) {
            tracing::warn!(
                unit = id,
                host = dps
                    .iter()
                    .find(|(u, _)| u == id)
                    .and_then(|(_, h)| h.as_deref()),
                silent_ms = age(id).map(|a| a.as_millis() as u64),
                "data plane silent: its buckets go to their backups"
            );
        }
        for id in self.silent.difference(&silent) {
            tracing::info!(
                unit = id,
                "data plane reports again: it may own buckets again"
            );
        }
        if silent != self.silent {
            self.dirty = true;
        }
        self.silent = silent;
    }

    /// Bring the bucket table's members in line with the data planes that are ready to own buckets.
    fn update_table(&mut self, now: Instant) {
        let Some(d) = &self.desired else { return };
        let n_buckets = d.spec.spec.layout.buckets;
        let born = *self.born.get_or_insert(now);
        let dps = self.desired_units(DesiredRole::Dataplane);
        let wanted: Vec<UnitId> = dps.iter().filter(|u| !u.draining).map(|u| u.id).collect();
        let connected: Vec<UnitId> = wanted
            .iter()
            .copied()
            .filter(|id| self.connected(*id))
            .collect();
        if self.table.is_none() {
            // The first table: adopted from the units (a manager that took over), or made. The
            // dispatchers hold the table flows follow; until each has said hello (or long enough
            // has passed for a dead one not to), a data plane's hello may be all we know, and a
            // fresh table would move every flow without its state.
            let dispatchers_heard = self
                .desired_units(DesiredRole::Dispatcher)
                .iter()
                .all(|u| self.connected(u.id));
            if !dispatchers_heard && now.duration_since(born) < FIRST_TABLE_WAIT {
                return;
            }
            if let Some((v, t)) = self.adopted.take() {
                if t.len() == n_buckets {
                    self.version = self.version.max(v);
                    self.released = self.version;
                    self.table_version = self.version;
                    self.dispatchers_switched = Some(now);
                    // The backups the data planes replicated to under this table: where a dead
                    // owner's buckets must go.
                    if let Some((_, b)) = self
                        .adopted_backups
                        .take()
                        .filter(|(e, b)| *e == t.epoch() && b.len() == t.len())
                    {
                        self.backups = b;
                        self.adopted_backups_for = Some(t.epoch());
                    }
                    self.adopted_at = Some(now);
                    self.set_table(t);
                }
            }
        }
        // Members must have ACKed a config (so they know their peers) before they own buckets.
        // The first table is the exception: nothing flows before the dispatchers get one.
        self.find_silent(now);
        let ready: Vec<UnitId> = wanted
            .iter()
            .copied()
            .filter(|id| self.units.get(id).is_some_and(|u| u.acked > 0))
            .filter(|id| !self.silent.contains(id))
            .filter(|id| {
                self.rejoin_after
                    .get(id)
                    .is_none_or(|v| self.units.get(id).is_some_and(|u| u.acked >= *v))
            })
            .collect();
        self.rejoin_after
            .retain(|id, _| wanted.contains(id) && !ready.contains(id));
        // Settling: units are still coming back to a manager that adopted their table. Over
        // once every desired dispatcher is connected and every desired data plane ready (the
        // missing ones are gone, not late): then one transition moves the dead members'
        // buckets to their backups and lets the newcomers join, rather than a table change per
        // arrival, each starting handovers of buckets the previous one just moved.
        let all_back = self
            .desired_units(DesiredRole::Dispatcher)
            .iter()
            .all(|u| self.connected(u.id))
            && wanted.iter().all(|id| ready.contains(id));
        let settling = self
            .adopted_at
            .is_some_and(|t| now.duration_since(t) < SETTLE_AFTER_START)
            && !all_back
            && self.table.is_some();
        let new_table = match &self.table {
            None if !connected.is_empty() => BucketTable::maglev(n_buckets, &connected).ok(),
            _ if settling => None,
            Some(t) if t.len() != n_buckets && !ready.is_empty() => {
                BucketTable::maglev(n_buckets, &ready).ok()
            }
            // Leavers first, then joiners (see `BucketTable::transition`): the reconciler may
            // report a death and its replacement in either order.
            Some(t) if !ready.is_empty() && t.members() != ready => {
                // A leaving member's bucket whose backup leaves too (or never was one) goes to
                // a data plane without its flows' state: worth a line, they will break.
                let unbacked = (0..t.len())
                    .filter(|&b| {
                        let owner = t.owner(b as u16);
                        !ready.contains(&owner)
                            && self.backups.get(b).is_none_or(|u| !ready.contains(u))
                    })
                    .count();
                if unbacked > 0 {
                    tracing::warn!(
                        unbacked,
                        leaving = ?t.members().iter().filter(|m| !ready.contains(m)).collect::<Vec<_>>(),
                        backups_known = self.backups.len(),
                        "buckets of leaving data planes without a staying backup: their flows' state is lost"
                    );
                }
                t.transition(&ready, &self.backups).ok()
            }
            _ => None,
        };
        if let Some(mut t) = new_table {
            // A silent data plane is no previous owner to punt to (nothing reaches it), and out
            // of every history its stale copies are dropped when it takes a config again.
            for &id in &self.silent {
                for b in 0..t.len() {
                    t.retire(b as u16, id);
                }
                if !t.members().contains(&id) {
                    self.rejoin_after.entry(id).or_insert(self.version + 1);
                }
            }
            // One line per table change: the unit log is where an operator (or a failing test)
            // reconstructs which data plane owned what when.
            tracing::info!(
                epoch = t.epoch(),
                config_version = self.version + 1,
                members = ?t.members(),
                desired = ?wanted,
                "new bucket table"
            );
            self.set_table(t);
            self.table_version = self.version + 1;
            self.dispatchers_switched = None;
            // A table that replaces one not yet switched to restarts the clock: the dispatchers
            // will switch straight to the newer one.
            self.table_sent = None;
            self.dirty = true;
        }
        self.refresh_fenced();
        self.retire(now);
    }

    /// Drop previous owners from bucket histories once they hold no flows there.
    fn retire(&mut self, now: Instant) {
        if self
            .last_retire
            .is_some_and(|t| now.duration_since(t) < RETIRE_EVERY)
        {
            return;
        }
        self.last_retire = Some(now);
        let Some(table) = &self.table else { return };
        let known: BTreeSet<UnitId> = self
            .desired
            .as_ref()
            .map(|d| d.units.iter().map(|u| u.id).collect())
            .unwrap_or_default();
        let settled = self
            .dispatchers_switched
            .filter(|t| now.duration_since(*t) >= RETIRE_SETTLE);
        let mut t = table.clone();
        let mut changed = false;
        for b in 0..t.len() {
            let bucket = b as u16;
            let history = t.bucket(bucket).history.clone();
            for h in history {
                let gone = !known.contains(&h) || self.silent.contains(&h);
                let empty = settled.is_some_and(|switched| {
                    self.units.get(&h).is_some_and(|u| {
                        u.report.as_ref().is_some_and(|(at, r)| {
                            *at > switched
                                && r.version >= self.table_version
                                && !r.bucket_flows.iter().any(|(bb, n)| *bb == bucket && *n > 0)
                        })
                    })
                });
                if gone || empty {
                    changed |= t.retire(bucket, h);
                }
            }
        }
        if changed {
            self.set_table(t);
            self.dirty = true;
        }
    }

    /// Keep the backplane keys current: made on first need (or adopted from the units), then
    /// rotated every [`KEY_ROTATION`]. Units always hold the previous, current and next epochs'
    /// keys and seal with the current one; a rotation makes the next key current and adds a
    /// new next one. Every unit already holds the key it is asked to switch to, so units that
    /// take the new config a moment apart still understand each other.
    fn rotate_keys(&mut self, now: Instant) -> Result<(), String> {
        let fresh = |epoch: u32| -> Result<BackplaneKey, String> {
            let key = dva_io::seal::random_key().map_err(|e| format!("backplane key: {e}"))?;
            Ok(BackplaneKey { epoch, key })
        };
        let (mut auth, since) = match self.keys.take() {
            Some(k) => k,
            None => match self.adopted_keys.take() {
                Some(a) => (a, now),
                None => (
                    BackplaneAuth {
                        send_epoch: 1,
                        keys: vec![fresh(1)?],
                    },
                    now,
                ),
            },
        };
        let rotate = now.duration_since(since) >= KEY_ROTATION;
        if rotate {
            auth.send_epoch += 1;
        }
        let next = auth.send_epoch + 1;
        if !auth.keys.iter().any(|k| k.epoch == next) {
            auth.keys.push(fresh(next)?);
        }
        if !auth.keys.iter().any(|k| k.epoch == auth.send_epoch) {
            auth.keys.push(fresh(auth.send_epoch)?);
        }
        let oldest = auth.send_epoch.saturating_sub(1);
        auth.keys.retain(|k| k.epoch >= oldest && k.epoch <= next);
        auth.keys.sort_by_key(|k| k.epoch);
        if rotate {
            tracing::info!(
                epoch = auth.send_epoch,
                held = ?auth.keys.iter().map(|k| k.epoch).collect::<Vec<_>>(),
                "backplane key rotated"
            );
        }
        self.keys = Some((auth, if rotate { now } else { since }));
        Ok(())
    }

    fn recompile(&mut self) {
        let (Some(d), Some(table), Some((auth, _))) = (&self.desired, &self.table, &self.keys)
        else {
            return;
        };
        let from = Revisions {
            keys: auth.send_epoch,
            ..self.revs
        };
        if self.compiled_from == Some(from) {
            return;
        }
        let endpoints = |role| {
            d.units
                .iter()
                .filter(|u| u.role == role)
                .map(|u| UnitEndpoint {
                    id: u.id,
                    addr: u.addr,
                })
                .collect::<Vec<_>>()
        };
        let placement = Placement {
            dispatchers: endpoints(DesiredRole::Dispatcher),
            dataplanes: endpoints(DesiredRole::Dataplane),
            table: table.clone(),
        };
        let exporting: Vec<UnitId> = d.units.iter().filter(|u| u.export).map(|u| u.id).collect();
        let (down, fenced) = (&self.down, &self.fenced);
        let version = self.version + 1;
        // Each bucket's backup on another machine than its owner where there is one: a
        // machine's loss takes all its data planes at once, and a backup beside its owner would
        // go with it.
        let hosts = &self.hosts;
        // A table adopted from the units keeps the backups they replicated to until it changes:
        // recomputed, a dead member's (whose machine this manager never knew) could name a data
        // plane without its buckets' state.
        let backups = match &self.adopted_backups_for {
            Some(epoch) if *epoch == table.epoch() && self.backups.len() == table.len() => {
                self.backups.clone()
            }
            _ => table.backups_apart(&|u| hosts.get(&u).cloned()),
        };
        match compile(&d.spec, &placement, version) {
            Ok((disps, dps)) => {
                self.configs = disps
                    .into_iter()
                    .map(|mut c| {
                        c.backplane = auth.clone();
                        c.fenced = fenced.clone();
                        (c.unit, RoleConfig::Dispatcher(c))
                    })
                    .chain(dps.into_iter().map(|mut c| {
                        c.backplane = auth.clone();
                        c.export = exporting.contains(&c.unit);
                        c.backups = backups.clone();
                        for (service, backend) in down {
                            c.backend_states
                                .retain(|s| !(&s.service == service && &s.backend == backend));
                            c.backend_states.push(BackendStateConfig {
                                service: service.clone(),
                                backend: backend.clone(),
                                state: BackendState::Down,
                            });
                        }
                        (c.unit, RoleConfig::Dataplane(c))
                    }))
                    .collect();
                self.version = version;
                self.backups = backups;
                self.error = None;
            }
            Err(e) => {
                // The previous configs keep serving; the error reaches the API through the status.
                self.error = Some(format!("config version {version} not compiled: {e}"));
            }
        }
        self.compiled_from = Some(from);
        self.dirty = true;
    }

    /// Load-balancer backends the dispatchers' health checks find down: each connected
    /// dispatcher votes, and a backend is down when more of them say so than not (one
    /// dispatcher cut off from a backend does not take it out of rotation for all).
    fn backends_down(&self) -> Vec<(String, String)> {
        let mut votes: BTreeMap<(String, String), (u32, u32)> = BTreeMap::new();
        for du in self.desired_units(DesiredRole::Dispatcher) {
            let Some(u) = self.units.get(&du.id).filter(|u| u.conn.is_some()) else {
                continue;
            };
            let Some((_, r)) = &u.report else { continue };
            for h in &r.health {
                let v = votes
                    .entry((h.service.clone(), h.backend.clone()))
                    .or_default();
                if h.up {
                    v.0 += 1;
                } else {
                    v.1 += 1;
                }
            }
        }
        votes
            .into_iter()
            .filter(|(_, (up, down))| down > up)
            .map(|(k, _)| k)
            .collect()
    }

    fn push(&mut self, now: Instant) {
        let version = self.version;
        if version == 0 {
            return;
        }
        let dp_ids: Vec<UnitId> = self
            .desired_units(DesiredRole::Dataplane)
            .iter()
            .map(|u| u.id)
            .collect();
        let disp_ids: Vec<UnitId> = self
            .desired_units(DesiredRole::Dispatcher)
            .iter()
            .map(|u| u.id)
            .collect();
        // The table switch starts with the first push of the version carrying it (to the data
        // planes, which get it first).
        if version >= self.table_version
            && self.dispatchers_switched.is_none()
            && self.table_sent.is_none()
        {
            self.table_sent = Some(now);
        }
        for id in &dp_ids {
            // A silent data plane's socket may be one a cut link left open: a write could block
            // the manager for its timeout. It gets the version when it reports again.
            if !self.silent.contains(id) {
                self.send_config(*id, version, now);
            }
        }
        if self.released < version {
            let oldest_send = dp_ids
                .iter()
                .filter_map(|id| self.units.get(id).and_then(|u| u.sent_at))
                .min();
            let all_answered = dp_ids.iter().all(|id| {
                self.silent.contains(id)
                    || self.units.get(id).is_none_or(|u| {
                        u.conn.is_none()
                            || u.acked >= version
                            || u.nack.as_ref().is_some_and(|(v, _)| *v >= version)
                    })
            });
            let timed_out =
                oldest_send.is_some_and(|t| now.duration_since(t) > DATAPLANE_ACK_TIMEOUT);
            if all_answered || timed_out {
                self.released = version;
            }
        }
        if self.released >= version {
            for id in &disp_ids {
                self.send_config(*id, version, now);
            }
            if self.dispatchers_switched.is_none()
                && disp_ids.iter().all(|id| {
                    self.units
                        .get(id)
                        .is_some_and(|u| u.acked >= self.table_version)
                })
            {
                self.dispatchers_switched = Some(now);
                if let Some(sent) = self.table_sent.take() {
                    self.latency.table_switch.observe(now.duration_since(sent));
                }
            }
        }
    }

    fn send_config(&mut self, id: UnitId, version: u64, now: Instant) {
        let Some(cfg) = self.configs.get(&id) else {
            return;
        };
        let Some(u) = self.units.get_mut(&id) else {
            return;
        };
        let Some(conn) = u.conn else { return };
        if u.acked >= version {
            return;
        }
        let nacked_this = u.nack.as_ref().is_some_and(|(v, _)| *v >= version);
        let resend = u
            .sent_at
            .is_some_and(|t| now.duration_since(t) > RESEND_AFTER);
        if (u.sent >= version && !resend) || nacked_this {
            return;
        }
        self.next_nonce += 1;
        u.nonce = self.next_nonce;
        u.sent = version;
        u.sent_at = Some(now);
        if u.first_sent.is_none_or(|(v, _)| v != version) {
            u.first_sent = Some((version, now));
        }
        let msg = FromManager::Config {
            version,
            nonce: u.nonce,
            config: Box::new(cfg.clone()),
        };
        self.outputs.push(Output::Send(conn, msg));
    }

    /// Tell every unit heard from lately that this manager lives (see [`FromManager::Alive`]).
    /// Silent units are skipped: a write to a machine that died could only fill its buffer.
    fn keepalive(&mut self, now: Instant) {
        let every = Duration::from_millis(dva_proto::channel::REPORT_INTERVAL_MS);
        if self
            .last_alive
            .is_some_and(|t| now.duration_since(t) < every)
        {
            return;
        }
        self.last_alive = Some(now);
        let conns: Vec<ConnId> = self
            .units
            .iter()
            .filter(|(id, _)| !self.silent.contains(id))
            .filter_map(|(_, u)| u.conn)
            .collect();
        for conn in conns {
            self.outputs.push(Output::Send(conn, FromManager::Alive));
        }
    }

    fn send_status(&mut self) {
        if self.controllers.is_empty() {
            return;
        }
        let status = self.status();
        let msg = FromManager::Status(Box::new(status));
        let ids: Vec<ConnId> = self.controllers.iter().copied().collect();
        for id in ids {
            self.outputs.push(Output::Send(id, msg.clone()));
        }
    }

    fn status(&self) -> ManagerStatus {
        let Some(d) = &self.desired else {
            return ManagerStatus::default();
        };
        let mut units = Vec::new();
        let mut converged = self.version > 0;
        let mut error = self.error.clone();
        for du in &d.units {
            let u = self.units.get(&du.id);
            let connected = u.is_some_and(|u| u.conn.is_some());
            let acked = u.map_or(0, |u| u.acked);
            let nack = u
                .and_then(|u| u.nack.as_ref())
                .filter(|(v, _)| *v >= acked)
                .map(|(v, e)| format!("unit {} refused config version {v}: {e}", du.id));
            // A unit not connected yet (starting) or any more (dead, about to be replaced) has
            // not got the current version either.
            if !connected || acked < self.version {
                converged = false;
            }
            if error.is_none() {
                error = nack.clone();
            }
            let (buckets, history_buckets) = self.table.as_ref().map_or((0, 0), |t| {
                let owned = t.owned_by(du.id) as u32;
                let hist = t
                    .buckets()
                    .iter()
                    .filter(|b| b.history.contains(&du.id))
                    .count() as u32;
                (owned, hist)
            });
            units.push(UnitStatus {
                id: du.id,
                connected,
                acked,
                nack,
                report: u.and_then(|u| u.report.as_ref().map(|(_, r)| r.clone())),
                buckets,
                history_buckets,
            });
        }
        ManagerStatus {
            generation: d.generation,
            version: self.version,
            converged,
            error,
            units,
            leader: self.me,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn epochs(s: &State) -> (u32, Vec<u32>) {
        let (auth, _) = s.keys.as_ref().expect("keys");
        (auth.send_epoch, auth.keys.iter().map(|k| k.epoch).collect())
    }

    /// A manager state with data planes `dps` (id, host), every one connected, configured and
    /// reporting at `t0`, and its first bucket table made.
    fn running(dps: &[(UnitId, &str)], t0: Instant) -> State {
        let spec = dva_proto::ApplianceSpec::from_yaml(include_str!(
            "../../../../examples/edge-firewall.yaml"
        ))
        .expect("example spec");
        let units = dps
            .iter()
            .map(|&(id, host)| dva_proto::channel::DesiredUnit {
                id,
                role: DesiredRole::Dataplane,
                addr: "127.0.0.1:1".parse().expect("addr"),
                draining: false,
                export: false,
                host: Some(host.to_string()),
            })
            .collect();
        let mut s = State {
            desired: Some(Desired {
                generation: 1,
                spec,
                units,
            }),
            version: 1,
            ..State::default()
        };
        for (i, &(id, _)) in dps.iter().enumerate() {
            s.units.insert(
                id,
                UnitConn {
                    conn: Some(i as u64 + 1),
                    acked: 1,
                    report: Some((t0, UnitReport::default())),
                    ..UnitConn::default()
                },
            );
        }
        s.hosts = dps.iter().map(|&(id, h)| (id, h.to_string())).collect();
        s.update_table(t0);
        assert_eq!(s.table.as_ref().expect("table").members().len(), dps.len());
        // Compiled and handed out: the backups the data planes replicate to are now known.
        s.rotate_keys(t0).expect("keys");
        s.recompile();
        assert_eq!(s.backups.len(), s.table.as_ref().map_or(0, |t| t.len()));
        s
    }

    /// A dispatcher of the desired state, on `host`.
    fn dispatcher(id: UnitId, host: &str) -> dva_proto::channel::DesiredUnit {
        dva_proto::channel::DesiredUnit {
            id,
            role: DesiredRole::Dispatcher,
            addr: "127.0.0.1:2".parse().expect("addr"),
            draining: false,
            export: false,
            host: Some(host.into()),
        }
    }

    fn report(s: &mut State, id: UnitId, at: Instant) {
        if let Some(u) = s.units.get_mut(&id) {
            u.report = Some((at, UnitReport::default()));
        }
    }

    #[test]
    fn the_spec_s_runtime_reaches_the_role_configs() {
        let t0 = Instant::now();
        let mut s = running(&[(3, "a"), (4, "a")], t0);
        let mut d = s.desired.clone().expect("desired");
        d.generation += 1;
        d.spec = dva_proto::ApplianceSpec::from_yaml(&include_str!(
            "../../../../examples/edge-firewall.yaml"
        ).replace(
            "  layout:",
            "  runtime: { driver: af_packet, busy_poll: 50us, backplane: udp, cpus: \"0-1\" }\n  layout:",
        ))
        .expect("spec with a runtime section");
        d.units.push(dispatcher(1, "a"));
        s.set_desired(d);
        s.recompile();
        assert_eq!(s.error, None);
        let runtime = |id| s.configs.get(&id).map(|c| c.runtime().clone());
        assert_eq!(
            runtime(1),
            Some(dva_proto::RuntimeConfig {
                driver: dva_proto::spec::DriverSpec::AfPacket,
                busy_poll_us: 50,
                rings: false,
                cpus: vec![0, 1],
                dispatcher_threads: 1,
                dataplane_threads: 1,
            })
        );
        // Data planes drive no interface: only what they use.
        for id in [3, 4] {
            assert_eq!(
                runtime(id),
                Some(dva_proto::RuntimeConfig {
                    rings: false,
                    cpus: vec![0, 1],
                    ..dva_proto::RuntimeConfig::default()
                })
            );
        }
    }

    // A silent machine's failover to the backups, and the fencing of its units until they
    // rejoin: tests/conformance/manager/failover-silent.txt.

    #[test]
    fn one_silent_unit_leaves_alone_when_its_neighbours_report() {
        let t0 = Instant::now();
        let mut s = running(&[(3, "a"), (4, "a"), (5, "b")], t0);
        let before = s.table.clone().expect("table");
        let backups = s.backups.clone();
        let t = t0 + Duration::from_secs(5);
        report(&mut s, 3, t - Duration::from_millis(900));
        report(&mut s, 4, t - Duration::from_millis(300));
        report(&mut s, 5, t - Duration::from_millis(100));
        s.update_table(t);
        assert_eq!(s.silent, [3].into_iter().collect::<BTreeSet<_>>());
        let after = s.table.clone().expect("table");
        assert_eq!(after.members(), vec![4, 5]);
        for b in 0..before.len() as u16 {
            if before.owner(b) == 3 {
                assert_eq!(after.owner(b), backups[usize::from(b)]);
                assert_eq!(after.owner(b), 5, "the backup is on the other machine");
            }
        }
        // A unit whose process died leaves the desired state (the management tool saw it exit)
        // before the manager fails it over: its host is unknown by then, and its buckets must
        // still go where they were replicated, to the other machine.
        // The new desired state is compiled before the table changes (a manager still settling
        // after its start does not move buckets): the backups must not change meanwhile.
        let mut s = running(&[(3, "a"), (4, "a"), (5, "b")], t0);
        let mut d = s.desired.clone().expect("desired");
        d.units.retain(|u| u.id != 3);
        s.on_msg(t0, 99, ToManager::Desired(Box::new(d)));
        s.recompile();
        assert_eq!(
            s.backups, backups,
            "backups kept while 3 is still in the table"
        );
        for id in [4, 5] {
            report(&mut s, id, t);
        }
        s.update_table(t);
        assert!(s.silent.is_empty());
        let after = s.table.clone().expect("table");
        assert_eq!(after.members(), vec![4, 5]);
        for b in 0..before.len() as u16 {
            if before.owner(b) == 3 {
                assert_eq!(
                    after.owner(b),
                    backups[usize::from(b)],
                    "bucket {b} went where it was replicated"
                );
            }
        }
        // A unit that never reported (just started) is not silent.
        let mut s = running(&[(3, "a"), (5, "b")], t0);
        if let Some(u) = s.units.get_mut(&3) {
            u.report = None;
        }
        report(&mut s, 5, t);
        s.update_table(t);
        assert!(s.silent.is_empty());
    }

    /// A step compiles a new version when, and only when, something configs are made from
    /// changed: the desired state, the table, the keys, the backends found down, the fenced set.
    #[test]
    fn a_version_is_compiled_when_its_inputs_change_and_only_then() {
        let t0 = Instant::now();
        let mut s = running(&[(3, "a"), (4, "b")], t0);
        let mut d = s.desired.clone().expect("desired");
        d.units.push(dispatcher(1, "d"));
        s.set_desired(d);
        s.units.insert(
            1,
            UnitConn {
                conn: Some(9),
                role: "dispatcher".into(),
                ..UnitConn::default()
            },
        );
        let mut t = t0;
        // Reports keep coming (a step must not take them for a change) and time passes.
        fn step_by(s: &mut State, t: &mut Instant, by: Duration, reporting: &[UnitId]) -> u64 {
            *t += by;
            for id in reporting {
                if let Some(u) = s.units.get_mut(id) {
                    let version = s.version;
                    u.report = Some((
                        *t,
                        UnitReport {
                            version,
                            ..UnitReport::default()
                        },
                    ));
                }
            }
            s.step(*t);
            s.version
        }
        let mut step = |s: &mut State, by: Duration| step_by(s, &mut t, by, &[1, 3, 4]);
        let v = step(&mut s, Duration::from_millis(50));
        assert_eq!(
            step(&mut s, Duration::from_millis(50)),
            v,
            "nothing changed"
        );
        assert_eq!(
            step(&mut s, Duration::from_millis(300)),
            v,
            "nothing changed"
        );

        // The desired state: a new spec generation.
        let mut d = s.desired.clone().expect("desired");
        d.generation += 1;
        s.set_desired(d.clone());
        let v = step(&mut s, Duration::from_millis(50));
        assert_eq!(s.compiled_from.map(|r| r.desired), Some(s.revs.desired));
        assert_eq!(step(&mut s, Duration::from_millis(50)), v);
        // The same desired state again is no change.
        s.set_desired(d.clone());
        assert_eq!(step(&mut s, Duration::from_millis(50)), v);

        // The table: a data plane drains (its buckets move), the spec's generation stays.
        let table = s.revs.table;
        d.units
            .iter_mut()
            .filter(|u| u.id == 4)
            .for_each(|u| u.draining = true);
        s.set_desired(d.clone());
        let v2 = step(&mut s, Duration::from_millis(50));
        assert!(
            v2 > v && s.revs.table > table,
            "the table changed: {v} -> {v2}"
        );
        let v = v2;
        assert_eq!(step(&mut s, Duration::from_millis(50)), v);
        // Its history retired (it holds no flows; the dispatcher switched long enough ago): the
        // table changes without a new epoch.
        assert!(s
            .table
            .as_ref()
            .is_some_and(|t| t.buckets().iter().any(|b| b.history == [4])));
        for id in [1, 3, 4] {
            if let Some(u) = s.units.get_mut(&id) {
                u.acked = v;
            }
        }
        let epoch = s.table.as_ref().map(|t| t.epoch());
        let mut retired = v;
        for _ in 0..4 {
            retired = step(&mut s, Duration::from_millis(300));
        }
        assert_eq!(s.table.as_ref().map(|t| t.epoch()), epoch);
        assert!(s
            .table
            .as_ref()
            .is_some_and(|t| t.buckets().iter().all(|b| b.history.is_empty())));
        assert_eq!(retired, v + 1, "the retirement is compiled once");
        let v = retired;

        // The keys: a rotation.
        let keys = s.keys.as_ref().map(|(k, _)| k.send_epoch);
        let v2 = step(&mut s, KEY_ROTATION);
        assert!(v2 > v && s.keys.as_ref().map(|(k, _)| k.send_epoch) > keys);
        let v = v2;
        assert_eq!(step(&mut s, Duration::from_millis(50)), v);

        // The backends: the dispatcher finds one down, then still down (no change), then up.
        let health = |up| dva_proto::channel::BackendHealth {
            service: "web".into(),
            backend: "198.18.2.10:80".into(),
            up,
            error: None,
        };
        let dispatcher_says = |s: &mut State, up: bool, at: Instant| {
            s.on_msg(
                at,
                9,
                ToManager::Report(UnitReport {
                    health: vec![health(up)],
                    ..UnitReport::default()
                }),
            )
        };
        let mut step =
            |s: &mut State, by: Duration, reporting: &[UnitId]| step_by(s, &mut t, by, reporting);
        dispatcher_says(&mut s, false, t0);
        let v2 = step(&mut s, Duration::from_millis(50), &[3, 4]);
        assert_eq!(v2, v + 1, "a backend went down");
        dispatcher_says(&mut s, false, t0);
        assert_eq!(
            step(&mut s, Duration::from_millis(50), &[3, 4]),
            v2,
            "still down"
        );
        dispatcher_says(&mut s, true, t0);
        assert_eq!(
            step(&mut s, Duration::from_millis(50), &[3, 4]),
            v2 + 1,
            "up again"
        );
        let v = v2 + 1;

        // The fenced set alone: data plane 3, the table's only member, falls silent (with no
        // other member, its buckets stay).
        let (fenced, table) = (s.revs.fenced, s.revs.table);
        assert_eq!(step(&mut s, SILENT_AFTER, &[1, 4]), v + 1, "3 is fenced");
        assert_eq!(s.fenced, vec![3]);
        assert!(s.revs.fenced > fenced && s.revs.table == table);
    }

    #[test]
    fn keys_rotate_with_the_next_one_handed_out_ahead() {
        let mut s = State::default();
        let t0 = Instant::now();
        s.rotate_keys(t0).expect("keys");
        assert_eq!(epochs(&s), (1, vec![1, 2]));
        let first = s.keys.as_ref().expect("keys").0.keys[1].key;
        // Nothing changes before the period is over.
        s.rotate_keys(t0 + KEY_ROTATION / 2).expect("keys");
        assert_eq!(epochs(&s), (1, vec![1, 2]));
        // The next key becomes current (every unit already holds it), a new next one appears.
        s.rotate_keys(t0 + KEY_ROTATION).expect("keys");
        assert_eq!(epochs(&s), (2, vec![1, 2, 3]));
        assert_eq!(s.keys.as_ref().expect("keys").0.keys[1].key, first);
        s.rotate_keys(t0 + KEY_ROTATION * 2).expect("keys");
        assert_eq!(epochs(&s), (3, vec![2, 3, 4]));
        // Keys are random, not derived from one another.
        let auth = &s.keys.as_ref().expect("keys").0;
        assert_ne!(auth.keys[0].key, auth.keys[1].key);
        assert_ne!(auth.keys[1].key, auth.keys[2].key);
    }

    /// A unit on connection 1 with version 3 sent to it `ago`, under nonce 7, and the time now.
    fn waiting(role: &str, ago: Duration) -> (State, Instant) {
        let t0 = Instant::now();
        let mut s = State::default();
        s.units.insert(
            5,
            UnitConn {
                conn: Some(1),
                role: role.into(),
                sent: 3,
                nonce: 7,
                first_sent: Some((3, t0)),
                ..Default::default()
            },
        );
        (s, t0 + ago)
    }

    fn acks(s: &State, role: &str) -> (u64, f64) {
        let snap = s.latency.snapshot();
        let h = &snap.config_ack[role];
        (h.count(), h.sum())
    }

    #[test]
    fn the_first_ack_of_a_send_is_timed_by_the_acking_role() {
        let (mut s, now) = waiting("dataplane", Duration::from_millis(40));
        // A stale ACK (an older send's nonce) is not this send's.
        s.on_msg(
            now,
            1,
            ToManager::Ack {
                version: 3,
                nonce: 6,
            },
        );
        assert_eq!(acks(&s, "dataplane").0, 0);
        s.on_msg(
            now,
            1,
            ToManager::Ack {
                version: 3,
                nonce: 7,
            },
        );
        let (n, sum) = acks(&s, "dataplane");
        assert_eq!(n, 1);
        assert!((0.04..5.0).contains(&sum), "{sum}");
        // A repeated ACK is not timed again; nothing lands under another role.
        s.on_msg(
            now,
            1,
            ToManager::Ack {
                version: 3,
                nonce: 7,
            },
        );
        assert_eq!(acks(&s, "dataplane").0, 1);
        assert_eq!(acks(&s, "dispatcher").0, 0);
        // A role the manager never configures is not recorded (the label set stays closed).
        let (mut s, now) = waiting("manager", Duration::from_millis(1));
        s.on_msg(
            now,
            1,
            ToManager::Ack {
                version: 3,
                nonce: 7,
            },
        );
        assert!(s
            .latency
            .snapshot()
            .config_ack
            .values()
            .all(|h| h.count() == 0));
    }

    #[test]
    fn a_table_switch_is_timed_from_its_first_push_to_the_last_dispatcher_ack() {
        let spec = dva_proto::ApplianceSpec::from_yaml(include_str!(
            "../../../../examples/edge-firewall.yaml"
        ))
        .expect("example spec");
        let mut s = State {
            desired: Some(Desired {
                generation: 1,
                spec,
                units: vec![dva_proto::channel::DesiredUnit {
                    id: 2,
                    role: DesiredRole::Dispatcher,
                    addr: "127.0.0.1:1".parse().expect("addr"),
                    draining: false,
                    export: false,
                    host: None,
                }],
            }),
            version: 4,
            table_version: 4,
            released: 4,
            ..State::default()
        };
        s.units.insert(2, UnitConn::default());
        let t0 = Instant::now();
        s.push(t0);
        assert_eq!(s.table_sent, Some(t0));
        assert_eq!(s.latency.table_switch.count(), 0, "not switched yet");
        s.push(t0 + Duration::from_millis(10));
        assert_eq!(
            s.table_sent,
            Some(t0),
            "a later push does not restart the clock"
        );
        if let Some(u) = s.units.get_mut(&2) {
            u.acked = 4;
        }
        s.push(t0 + Duration::from_millis(30));
        assert_eq!(s.latency.table_switch.count(), 1);
        assert!((s.latency.table_switch.sum() - 0.03).abs() < 1e-9);
        // Switched: further pushes of the same table time nothing.
        s.push(t0 + Duration::from_millis(50));
        assert_eq!(s.latency.table_switch.count(), 1);
        assert_eq!(s.table_sent, None);
    }

    #[test]
    fn a_new_manager_goes_on_with_the_keys_the_units_hold() {
        let held = BackplaneAuth {
            send_epoch: 7,
            keys: vec![
                BackplaneKey {
                    epoch: 6,
                    key: [6; 32],
                },
                BackplaneKey {
                    epoch: 7,
                    key: [7; 32],
                },
            ],
        };
        let mut s = State {
            adopted_keys: Some(held),
            ..State::default()
        };
        s.rotate_keys(Instant::now()).expect("keys");
        let (auth, _) = s.keys.as_ref().expect("keys");
        assert_eq!(auth.send_epoch, 7);
        let e: Vec<u32> = auth.keys.iter().map(|k| k.epoch).collect();
        assert_eq!(e, vec![6, 7, 8], "the next epoch's key is added ahead");
        assert_eq!(auth.keys[1].key, [7; 32], "the current key is the units'");
    }
}
