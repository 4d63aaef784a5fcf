//! The manager's conformance cases, as data (holo's habit): each file of
//! `crates/unit/tests/conformance/manager/*.txt` is a desired state, a sequence of inputs (units
//! connecting, ACKing, NACKing, reporting or falling silent, the management tool changing the
//! desired state, time passing, the manager restarting) and the outputs and table facts expected
//! after them. This harness drives [`State`] through [`State::handle`] with a virtual clock and
//! plays the units; a new case is a new file, not new code.
//!
//! The language: one command a line, `#` starts a comment. Time moves only with `wait`.
//!
//! Desired-state edits (the management tool sends them with `desired`):
//! * `buckets N`; `unit ID dispatcher|dataplane [host=H]`; `drain ID`; `remove ID`.
//!
//! Inputs:
//! * `desired [generation=N]`: the management tool sends the desired state;
//! * `hello ID...`: each unit connects and says hello, with the config it runs (its last ACKed);
//! * `close ID`: its connection ends;
//! * `mute ID...` / `unmute ID...`: it stops (resumes) reporting and answering, its machine cut
//!   off; what it is sent meanwhile waits for it, as TCP would hold it;
//! * `nack ID TEXT` / `nack ID off`: it NACKs every config from now on (or no more);
//! * `flows ID B:N... | none | history`: what its reports say it holds (`history`: one flow in
//!   every bucket whose history names it now);
//! * `hello-as CERT ID`, `send-desired-as ID`: a unit's certificate says what it may not;
//! * `wait MS`: time passes in 50 ms ticks; before each tick the units answer the configs of the
//!   previous one and report every 250 ms; `tick`: one tick, no time passing;
//! * `restart`: a new manager takes over (every connection closes; units say `hello` again);
//! * `mark NAME`: remember the table, backups and keys now.
//!
//! Expectations, about the outputs since the first input after the previous expectation, or about
//! the manager now:
//! * outputs: `expect config ID... vN`, `no-config ID...`, `alive ID...`, `no-alive ID...`,
//!   `closed ID`, and the last status sent: `status converged=BOOL`, `status error none | TEXT`,
//!   `status nack ID none | TEXT`;
//! * the last config each dispatcher got: `expect fenced none | ID...`;
//! * the manager: `expect version N`, `members ID...`, `owned ID=N...`, `history none | ID=N...`
//!   (buckets whose history names ID), `silent none | ID...`, `failed-over NAME ID...` (their
//!   buckets in NAME's table went to NAME's backups, the others stayed), `table-as NAME`,
//!   `backups-as NAME`, `keys-as NAME` (the last configs carry NAME's keys), `backups-apart`
//!   (each bucket's backup on another host than its owner).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use dva_flow::{BucketTable, UnitId};
use dva_proto::channel::{
    Desired, DesiredRole, DesiredUnit, FromManager, ManagerStatus, Running, ToManager, UnitReport,
    REPORT_INTERVAL_MS,
};
use dva_proto::role::BackplaneAuth;
use dva_proto::RoleConfig;

use super::core::{ConnId, Input, Output, State};
use crate::tls::Peer;

const APPLIANCE: &str = "edge-fw";
/// The manager's own unit id.
const ME: UnitId = 100;
const TICK: Duration = Duration::from_millis(50);

/// What a unit says about its flows in its reports.
#[derive(Clone)]
enum Flows {
    Listed(Vec<(u16, u32)>),
    /// One flow in each bucket whose history names the unit (as of when it was set).
    History(Vec<u16>),
}

/// A unit as the cases play it.
struct SimUnit {
    role: DesiredRole,
    conn: Option<ConnId>,
    /// Configs got at the last tick: answered before the next one.
    inbox: Vec<(u64, u64, RoleConfig)>,
    /// The config it ACKed last.
    running: Option<RoleConfig>,
    /// The config it got last, ACKed or not.
    last_got: Option<RoleConfig>,
    muted: bool,
    nack: Option<String>,
    flows: Flows,
    last_report: Option<Instant>,
}

/// Who an output went to, as a case names it.
#[derive(Debug, Clone, PartialEq)]
enum To {
    Unit(UnitId),
    Mgmt,
    Other(ConnId),
}

#[derive(Debug, Clone)]
enum Seen {
    Config(To, u64),
    Alive(To),
    Status,
    Closed(To),
}

struct Mark {
    table: Option<BucketTable>,
    backups: Vec<UnitId>,
    keys: Option<BackplaneAuth>,
}

struct Case {
    name: String,
    line: usize,
    t0: Instant,
    now: Instant,
    st: State,
    next_conn: ConnId,
    mgmt: Option<ConnId>,
    generation: u64,
    buckets: usize,
    desired: Vec<DesiredUnit>,
    units: BTreeMap<UnitId, SimUnit>,
    window: Vec<Seen>,
    checked: bool,
    status: Option<ManagerStatus>,
    marks: BTreeMap<String, Mark>,
}

type Check = Result<(), String>;

fn spec(buckets: usize) -> dva_proto::ApplianceSpec {
    let text = include_str!("../../../../examples/edge-firewall.yaml")
        .replace("buckets: 4096", &format!("buckets: {buckets}"));
    dva_proto::ApplianceSpec::from_yaml(&text).expect("the example spec")
}

fn ids(words: &[&str]) -> Result<Vec<UnitId>, String> {
    words
        .iter()
        .map(|w| w.parse().map_err(|_| format!("{w:?} is not a unit id")))
        .collect()
}

fn num<T: std::str::FromStr>(w: Option<&&str>, what: &str) -> Result<T, String> {
    let w = w.ok_or(format!("missing {what}"))?;
    w.trim_start_matches('v')
        .parse()
        .map_err(|_| format!("{w:?} is not {what}"))
}

fn running_of(c: &RoleConfig) -> Running {
    let (table, backplane, backups) = match c {
        RoleConfig::Dispatcher(c) => (c.table.clone(), c.backplane.clone(), Vec::new()),
        RoleConfig::Dataplane(c) => (c.table.clone(), c.backplane.clone(), c.backups.clone()),
    };
    Running {
        version: c.version(),
        table,
        backplane,
        backups,
    }
}

impl Case {
    fn new(name: &str) -> Case {
        let t0 = Instant::now();
        Case {
            name: name.to_string(),
            line: 0,
            t0,
            now: t0,
            st: State::new(ME),
            next_conn: 1,
            mgmt: None,
            generation: 1,
            buckets: 64,
            desired: Vec::new(),
            units: BTreeMap::new(),
            window: Vec::new(),
            checked: false,
            status: None,
            marks: BTreeMap::new(),
        }
    }

    fn input(&mut self, input: Input) {
        self.st.handle(self.now, input);
        self.collect();
    }

    fn open(&mut self, peer: Peer) -> ConnId {
        let id = self.next_conn;
        self.next_conn += 1;
        self.input(Input::Opened(id, peer));
        id
    }

    fn to(&self, conn: ConnId) -> To {
        if self.mgmt == Some(conn) {
            return To::Mgmt;
        }
        self.units
            .iter()
            .find(|(_, u)| u.conn == Some(conn))
            .map_or(To::Other(conn), |(id, _)| To::Unit(*id))
    }

    /// Take the manager's outputs: configs reach the units' inboxes, the status is kept.
    fn collect(&mut self) {
        let outs: Vec<Output> = self.st.drain_outputs().collect();
        for out in outs {
            match out {
                Output::Send(conn, msg) => {
                    let to = self.to(conn);
                    match msg {
                        FromManager::Config {
                            version,
                            nonce,
                            config,
                        } => {
                            self.window.push(Seen::Config(to.clone(), version));
                            if let To::Unit(id) = to {
                                if let Some(u) = self.units.get_mut(&id) {
                                    u.last_got = Some((*config).clone());
                                    u.inbox.push((version, nonce, *config));
                                }
                            }
                        }
                        FromManager::Alive => self.window.push(Seen::Alive(to)),
                        FromManager::Status(s) => {
                            self.window.push(Seen::Status);
                            self.status = Some(*s);
                        }
                    }
                }
                Output::Close(conn, _why) => {
                    let to = self.to(conn);
                    self.window.push(Seen::Closed(to.clone()));
                    match to {
                        To::Unit(id) => {
                            if let Some(u) = self.units.get_mut(&id) {
                                u.conn = None;
                            }
                        }
                        To::Mgmt => self.mgmt = None,
                        To::Other(_) => {}
                    }
                    // The run loop shuts it down; its reader then ends.
                    self.st.handle(self.now, Input::Closed(conn));
                }
            }
        }
    }

    fn send_desired(&mut self, generation: Option<u64>) {
        if let Some(g) = generation {
            self.generation = g;
        }
        let conn = match self.mgmt {
            Some(c) => c,
            None => {
                let c = self.open(Peer::Mgmt);
                self.mgmt = Some(c);
                c
            }
        };
        let d = Desired {
            generation: self.generation,
            spec: spec(self.buckets),
            units: self.desired.clone(),
        };
        self.input(Input::Msg(conn, Box::new(ToManager::Desired(Box::new(d)))));
    }

    fn hello(&mut self, id: UnitId) -> Check {
        let u = self
            .units
            .get(&id)
            .ok_or(format!("unit {id} is not declared"))?;
        let role = match u.role {
            DesiredRole::Dispatcher => "dispatcher",
            DesiredRole::Dataplane => "dataplane",
        };
        let running = u.running.as_ref().map(running_of);
        let conn = self.open(Peer::Unit {
            appliance: APPLIANCE.into(),
            id,
        });
        if let Some(u) = self.units.get_mut(&id) {
            u.conn = Some(conn);
            u.inbox.clear();
            u.last_report = None;
        }
        let hello = ToManager::Hello {
            unit: id,
            role: role.into(),
            pid: 1000 + id,
            running,
        };
        self.input(Input::Msg(conn, Box::new(hello)));
        Ok(())
    }

    /// One run-loop turn at the current time: the units say what they have to, then a tick.
    fn tick(&mut self) {
        let ids: Vec<UnitId> = self.units.keys().copied().collect();
        for id in ids {
            let Some(u) = self.units.get_mut(&id) else {
                continue;
            };
            let Some(conn) = u.conn.filter(|_| !u.muted) else {
                continue;
            };
            let mut msgs = Vec::new();
            for (version, nonce, config) in u.inbox.drain(..) {
                match &u.nack {
                    Some(error) => msgs.push(ToManager::Nack {
                        version,
                        nonce,
                        error: error.clone(),
                    }),
                    None => {
                        u.running = Some(config);
                        msgs.push(ToManager::Ack { version, nonce });
                    }
                }
            }
            let every = Duration::from_millis(REPORT_INTERVAL_MS);
            if u.last_report
                .is_none_or(|t| self.now.saturating_duration_since(t) >= every)
            {
                u.last_report = Some(self.now);
                let bucket_flows = match &u.flows {
                    Flows::Listed(l) => l.clone(),
                    Flows::History(b) => b.iter().map(|b| (*b, 1)).collect(),
                };
                msgs.push(ToManager::Report(UnitReport {
                    version: u.running.as_ref().map_or(0, |c| c.version()),
                    bucket_flows,
                    ..UnitReport::default()
                }));
            }
            for m in msgs {
                self.input(Input::Msg(conn, Box::new(m)));
            }
        }
        self.input(Input::Tick);
    }

    fn unit(&mut self, id: UnitId) -> Result<&mut SimUnit, String> {
        self.units
            .get_mut(&id)
            .ok_or(format!("unit {id} is not declared"))
    }

    fn table(&self) -> Result<&BucketTable, String> {
        self.st.table().ok_or("no bucket table yet".to_string())
    }

    fn run_line(&mut self, words: &[&str]) -> Check {
        let is_expect = words[0] == "expect";
        if !is_expect && self.checked {
            self.window.clear();
            self.checked = false;
        }
        match words[0] {
            "buckets" => self.buckets = num(words.get(1), "a bucket count")?,
            "unit" => {
                let id: UnitId = num(words.get(1), "a unit id")?;
                let role = match words.get(2) {
                    Some(&"dispatcher") => DesiredRole::Dispatcher,
                    Some(&"dataplane") => DesiredRole::Dataplane,
                    other => return Err(format!("{other:?} is not a role")),
                };
                let host = words
                    .iter()
                    .find_map(|w| w.strip_prefix("host="))
                    .map(str::to_string);
                let port = match role {
                    DesiredRole::Dispatcher => 6081,
                    DesiredRole::Dataplane => 6082,
                };
                self.desired.retain(|u| u.id != id);
                self.desired.push(DesiredUnit {
                    id,
                    role,
                    addr: format!("127.0.0.{}:{port}", id % 250 + 1)
                        .parse()
                        .map_err(|e| format!("{e}"))?,
                    draining: false,
                    export: false,
                    host,
                });
                self.units.entry(id).or_insert(SimUnit {
                    role,
                    conn: None,
                    inbox: Vec::new(),
                    running: None,
                    last_got: None,
                    muted: false,
                    nack: None,
                    flows: Flows::Listed(Vec::new()),
                    last_report: None,
                });
            }
            "drain" | "remove" => {
                for id in ids(&words[1..])? {
                    if words[0] == "remove" {
                        self.desired.retain(|u| u.id != id);
                    } else {
                        let u = self.desired.iter_mut().find(|u| u.id == id);
                        u.ok_or(format!("unit {id} is not desired"))?.draining = true;
                    }
                }
            }
            "desired" => {
                let g = match words.get(1).and_then(|w| w.strip_prefix("generation=")) {
                    Some(g) => Some(g.parse().map_err(|_| format!("generation {g:?}"))?),
                    None => None,
                };
                self.send_desired(g);
            }
            "hello" => {
                for id in ids(&words[1..])? {
                    self.hello(id)?;
                }
            }
            "hello-as" => {
                let cert: UnitId = num(words.get(1), "a unit id")?;
                let claimed: UnitId = num(words.get(2), "a unit id")?;
                let conn = self.open(Peer::Unit {
                    appliance: APPLIANCE.into(),
                    id: cert,
                });
                self.unit(cert)?.conn = Some(conn);
                let hello = ToManager::Hello {
                    unit: claimed,
                    role: "dataplane".into(),
                    pid: 1,
                    running: None,
                };
                self.input(Input::Msg(conn, Box::new(hello)));
            }
            "send-desired-as" => {
                let id: UnitId = num(words.get(1), "a unit id")?;
                let conn = self
                    .unit(id)?
                    .conn
                    .ok_or(format!("unit {id} is not connected"))?;
                let d = Desired {
                    generation: 99,
                    spec: spec(self.buckets),
                    units: Vec::new(),
                };
                self.input(Input::Msg(conn, Box::new(ToManager::Desired(Box::new(d)))));
            }
            "close" => {
                for id in ids(&words[1..])? {
                    if let Some(conn) = self.unit(id)?.conn.take() {
                        self.input(Input::Closed(conn));
                    }
                }
            }
            "mute" | "unmute" => {
                // What comes meanwhile waits in its inbox: TCP delivers it once the link heals.
                for id in ids(&words[1..])? {
                    self.unit(id)?.muted = words[0] == "mute";
                }
            }
            "nack" => {
                let id: UnitId = num(words.get(1), "a unit id")?;
                let text = words[2..].join(" ");
                self.unit(id)?.nack = (text != "off").then_some(text);
            }
            "flows" => {
                let id: UnitId = num(words.get(1), "a unit id")?;
                let flows = match words.get(2) {
                    Some(&"none") => Flows::Listed(Vec::new()),
                    Some(&"history") => {
                        let t = self.table()?;
                        let b = (0..t.len() as u16)
                            .filter(|b| t.bucket(*b).history.contains(&id))
                            .collect();
                        Flows::History(b)
                    }
                    _ => Flows::Listed(
                        words[2..]
                            .iter()
                            .map(|w| {
                                let (b, n) = w.split_once(':').ok_or(format!("{w:?}: B:N"))?;
                                Ok((num(Some(&b), "a bucket")?, num(Some(&n), "a count")?))
                            })
                            .collect::<Result<_, String>>()?,
                    ),
                };
                self.unit(id)?.flows = flows;
            }
            "wait" => {
                let ms: u64 = num(words.get(1), "milliseconds")?;
                let end = self.now + Duration::from_millis(ms);
                while self.now + TICK <= end {
                    self.now += TICK;
                    self.tick();
                }
                self.now = end;
            }
            "tick" => self.tick(),
            "restart" => {
                self.st = State::new(ME);
                self.mgmt = None;
                for u in self.units.values_mut() {
                    u.conn = None;
                    u.inbox.clear();
                }
            }
            "mark" => {
                let name = words.get(1).ok_or("mark NAME")?.to_string();
                let keys = self
                    .units
                    .values()
                    .find_map(|u| u.running.as_ref())
                    .map(|c| running_of(c).backplane);
                let mark = Mark {
                    table: self.st.table().cloned(),
                    backups: self.st.backups().to_vec(),
                    keys,
                };
                self.marks.insert(name, mark);
            }
            "expect" => {
                self.checked = true;
                self.expect(&words[1..])?;
            }
            other => return Err(format!("unknown command {other:?}")),
        }
        Ok(())
    }

    fn configs_to(&self, id: UnitId) -> Vec<u64> {
        self.window
            .iter()
            .filter_map(|s| match s {
                Seen::Config(To::Unit(u), v) if *u == id => Some(*v),
                _ => None,
            })
            .collect()
    }

    fn mark(&self, name: Option<&&str>) -> Result<&Mark, String> {
        let name = name.ok_or("a mark's name")?;
        self.marks.get(*name).ok_or(format!("no mark {name:?}"))
    }

    fn status(&self) -> Result<&ManagerStatus, String> {
        self.status.as_ref().ok_or("no status sent yet".into())
    }

    fn expect(&self, words: &[&str]) -> Check {
        let rest = || words.get(1..).unwrap_or_default();
        let want_ids = || -> Result<Vec<UnitId>, String> {
            if rest() == ["none"] {
                Ok(Vec::new())
            } else {
                ids(rest())
            }
        };
        match words.first().copied().unwrap_or_default() {
            "config" => {
                let (v, units) = rest().split_last().ok_or("expect config ID... vN")?;
                let v: u64 = num(Some(v), "a version")?;
                for id in ids(units)? {
                    let got = self.configs_to(id);
                    if !got.contains(&v) {
                        return Err(format!(
                            "unit {id} got configs {got:?}, not v{v} (version {})",
                            self.st.version()
                        ));
                    }
                }
            }
            "no-config" => {
                for id in ids(rest())? {
                    let got = self.configs_to(id);
                    if !got.is_empty() {
                        return Err(format!("unit {id} got configs {got:?}"));
                    }
                }
            }
            "version" => {
                let v: u64 = num(words.get(1), "a version")?;
                if self.st.version() != v {
                    return Err(format!("version {}, not {v}", self.st.version()));
                }
            }
            "members" => {
                let want = want_ids()?;
                let got = self.table()?.members();
                if got != want {
                    return Err(format!("members {got:?}, not {want:?}"));
                }
            }
            "owned" | "history" => {
                let t = self.table()?;
                let count = |id: UnitId| {
                    t.buckets()
                        .iter()
                        .filter(|b| {
                            if words[0] == "owned" {
                                b.owner == id
                            } else {
                                b.history.contains(&id)
                            }
                        })
                        .count()
                };
                if rest() == ["none"] {
                    let named: Vec<&Vec<UnitId>> = t
                        .buckets()
                        .iter()
                        .map(|b| &b.history)
                        .filter(|h| !h.is_empty())
                        .collect();
                    if !named.is_empty() {
                        return Err(format!("{} buckets have history", named.len()));
                    }
                }
                for w in rest().iter().filter(|w| **w != "none") {
                    let (id, n) = w.split_once('=').ok_or(format!("{w:?}: ID=N"))?;
                    let id: UnitId = num(Some(&id), "a unit id")?;
                    let n: usize = num(Some(&n), "a count")?;
                    if count(id) != n {
                        let all: Vec<String> = self
                            .units
                            .keys()
                            .map(|u| format!("{u}={}", count(*u)))
                            .collect();
                        return Err(format!(
                            "{} {id}: {}, not {n} ({})",
                            words[0],
                            count(id),
                            all.join(" ")
                        ));
                    }
                }
            }
            "failed-over" => {
                let m = self.mark(words.get(1))?;
                let gone = ids(words.get(2..).unwrap_or_default())?;
                let before = m.table.as_ref().ok_or("the mark has no table")?;
                let after = self.table()?;
                for b in 0..before.len() as u16 {
                    let (was, now) = (before.owner(b), after.owner(b));
                    let want = if gone.contains(&was) {
                        m.backups.get(usize::from(b)).copied().ok_or("no backups")?
                    } else {
                        was
                    };
                    if now != want {
                        return Err(format!("bucket {b}: owner {now}, not {want} (was {was})"));
                    }
                }
            }
            "backups-apart" => {
                let t = self.table()?;
                let host = |id: UnitId| {
                    let u = self.desired.iter().find(|u| u.id == id);
                    u.and_then(|u| u.host.clone())
                };
                let backups = self.st.backups();
                for b in 0..t.len() as u16 {
                    let backup = backups.get(usize::from(b)).copied().ok_or("no backups")?;
                    if host(backup) == host(t.owner(b)) {
                        return Err(format!("bucket {b}: backup {backup} beside its owner"));
                    }
                }
            }
            "table-as" => {
                let m = self.mark(words.get(1))?;
                if m.table.as_ref() != Some(self.table()?) {
                    return Err("the table differs from the mark's".into());
                }
            }
            "backups-as" => {
                let m = self.mark(words.get(1))?;
                if m.backups != self.st.backups() {
                    return Err("the backups differ from the mark's".into());
                }
            }
            "keys-as" => {
                let m = self.mark(words.get(1))?;
                let now = self
                    .units
                    .values()
                    .find_map(|u| u.last_got.as_ref())
                    .map(|c| running_of(c).backplane);
                let held = m.keys.as_ref().ok_or("the mark has no keys")?;
                let now = now.ok_or("no config sent")?;
                if now.send_epoch != held.send_epoch || now.keys.first() != held.keys.first() {
                    return Err(format!(
                        "keys of epoch {}, not the units' {}",
                        now.send_epoch, held.send_epoch
                    ));
                }
            }
            "fenced" => {
                let want = want_ids()?;
                for (id, u) in &self.units {
                    if let Some(RoleConfig::Dispatcher(c)) = &u.last_got {
                        if c.fenced != want {
                            return Err(format!("dispatcher {id} fences {:?}", c.fenced));
                        }
                    }
                }
            }
            "silent" => {
                let want = want_ids()?;
                let got = self.st.silent();
                if got != want {
                    return Err(format!("silent {got:?}, not {want:?}"));
                }
            }
            "alive" | "no-alive" => {
                for id in ids(rest())? {
                    let got = self
                        .window
                        .iter()
                        .any(|s| matches!(s, Seen::Alive(To::Unit(u)) if *u == id));
                    if got != (words[0] == "alive") {
                        return Err(format!("unit {id}: alive sent: {got}"));
                    }
                }
            }
            "closed" => {
                let id: UnitId = num(words.get(1), "a unit id")?;
                let got = self
                    .window
                    .iter()
                    .any(|s| matches!(s, Seen::Closed(To::Unit(u)) if *u == id));
                if !got {
                    return Err(format!("unit {id}'s connection was not closed"));
                }
            }
            "status" => self.expect_status(rest())?,
            other => return Err(format!("unknown expectation {other:?}")),
        }
        Ok(())
    }

    fn expect_status(&self, words: &[&str]) -> Check {
        let s = self.status()?;
        match words {
            [w] if w.starts_with("converged=") => {
                let want = *w == "converged=true";
                if s.converged != want {
                    return Err(format!("converged: {} ({s:?})", s.converged));
                }
            }
            ["error", "none"] if s.error.is_some() => {
                return Err(format!("error: {:?}", s.error));
            }
            ["error", "none"] => {}
            ["error", text @ ..] => {
                let text = text.join(" ");
                if !s.error.as_deref().is_some_and(|e| e.contains(&text)) {
                    return Err(format!("error {:?} does not say {text:?}", s.error));
                }
            }
            ["nack", id, text @ ..] => {
                let id: UnitId = num(Some(id), "a unit id")?;
                let u = s.units.iter().find(|u| u.id == id);
                let nack = u
                    .ok_or(format!("unit {id} not in the status"))?
                    .nack
                    .clone();
                let ok = match text {
                    ["none"] => nack.is_none(),
                    _ => nack.as_deref().is_some_and(|n| n.contains(&text.join(" "))),
                };
                if !ok {
                    return Err(format!("unit {id}'s NACK: {nack:?}"));
                }
            }
            other => return Err(format!("unknown status expectation {other:?}")),
        }
        Ok(())
    }
}

/// Run one case; the first failure, with its line.
fn run_case(name: &str, text: &str) -> Check {
    let mut case = Case::new(name);
    for (i, line) in text.lines().enumerate() {
        case.line = i + 1;
        let line = line.split('#').next().unwrap_or_default();
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.is_empty() {
            continue;
        }
        case.run_line(&words).map_err(|e| {
            let at = case.now.saturating_duration_since(case.t0).as_millis();
            format!(
                "{}:{}: at {at} ms: {}: {e}",
                case.name,
                case.line,
                line.trim()
            )
        })?;
    }
    Ok(())
}

#[test]
fn manager_conformance_cases() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/conformance/manager");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("the cases' folder")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .collect();
    files.sort();
    assert!(files.len() >= 5, "cases in {}: {files:?}", dir.display());
    let mut failed = Vec::new();
    for f in &files {
        let name = f.file_name().map(|n| n.to_string_lossy().into_owned());
        let name = name.unwrap_or_default();
        let text = std::fs::read_to_string(f).expect("a case file");
        match run_case(&name, &text) {
            Ok(()) => eprintln!("{name}: ok"),
            Err(e) => failed.push(e),
        }
    }
    assert!(failed.is_empty(), "failed cases:\n{}", failed.join("\n"));
}
