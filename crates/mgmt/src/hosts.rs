//! The host registry: the machines that run `dva agent`, as the management tool knows them.
//!
//! An agent joins once (`POST /v1/hosts/{name}/join`, see [`crate::agent`]) and its record is
//! kept in the store. The leading `dva serve` polls every registered agent's status about once
//! a second ([`POLL_EVERY`]): that poll is the heartbeat. A host is
//! * `ready`: its last poll answered less than [`NOT_READY_AFTER`] ago: units may be placed on it;
//! * `not-ready`: polls failed for a while: its units are left alone (a slow network is not a
//!   dead machine), nothing new goes there;
//! * `lost`: no answer for `--host-lost-after`: its units count as dead and are replaced on other
//!   hosts; nothing is placed there again until it answers.
//!
//! [`HostProvisioner`] is the reconciler's provisioner once hosts are registered: a unit on an
//! agent's host is started, stopped and asked through that agent's API (mutual TLS with the
//! management tool's certificate), any other unit by the local provisioner.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::agent::{self, AgentStatus, AgentUnit, StartRequest, UnitRef};
use crate::provision::{Provisioner, UnitLaunch, UnitProcess};

/// How often the leader polls each agent.
pub const POLL_EVERY: Duration = Duration::from_secs(1);
/// A host whose agent has not answered for this long is `not-ready` (two polls missed, and a
/// little slack for a slow answer).
pub const NOT_READY_AFTER: Duration = Duration::from_millis(2500);
/// Default of `dva serve --host-lost-after`.
pub const DEFAULT_LOST_AFTER: Duration = Duration::from_secs(10);
/// How long one call to an agent may take.
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(3);

/// A registered host, as stored (`/dva/hosts/NAME` in etcd, `<state>/hosts/NAME.json` in files).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostRecord {
    pub name: String,
    /// Where the agent's API listens (TCP, mutual TLS).
    pub agent: SocketAddr,
    /// The address units on this host use for the backplane and the manager channel.
    pub backplane: IpAddr,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub cpus: u32,
    #[serde(default)]
    pub memory_mb: u64,
    pub joined_ms: u64,
}

impl HostRecord {
    /// Whether the host owns the appliance's interfaces (`dispatcher=true`).
    pub fn is_dispatcher(&self) -> bool {
        self.labels.get("dispatcher").is_some_and(|v| v == "true")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HostState {
    Ready,
    NotReady,
    Lost,
}

impl HostState {
    pub fn as_str(self) -> &'static str {
        match self {
            HostState::Ready => "ready",
            HostState::NotReady => "not-ready",
            HostState::Lost => "lost",
        }
    }
}

/// What `GET /v1/hosts` shows of one host.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostView {
    #[serde(flatten)]
    pub record: HostRecord,
    pub state: HostState,
    /// When its agent last answered (ms since the epoch), if it has since this replica started.
    pub last_seen_ms: Option<u64>,
    /// Units its agent runs (alive ones).
    pub units: usize,
    /// Why the last poll failed, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What an agent sends to join (`POST /v1/hosts/{name}/join`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    pub agent: SocketAddr,
    pub backplane: IpAddr,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub cpus: u32,
    #[serde(default)]
    pub memory_mb: u64,
}

/// What a join answers: the installation CA and the agent's own certificate and key.
#[derive(Clone, Serialize, Deserialize)]
pub struct JoinAnswer {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// A one-time join token as stored: only its hash, and when it expires.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinTokenRecord {
    pub expires_ms: u64,
}

/// How long a join token is good for.
pub const JOIN_TOKEN_TTL: Duration = Duration::from_secs(3600);

/// The SHA-256 of a join token, in hex: what the store keeps (a leaked store gives no token).
pub fn token_hash(token: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// A host name an agent may take: what a store key and a unit's `host` can hold safely.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && !name.starts_with(['-', '.'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "host name {name:?}: 1-63 letters, digits, '-', '_' or '.', not starting with '-' or '.'"
        ))
    }
}

/// One host as this replica sees it.
struct Entry {
    record: HostRecord,
    /// When this replica began to know it (a host never polled is lost this long after).
    known_since: Instant,
    last_ok: Option<Instant>,
    last_ok_ms: Option<u64>,
    status: Option<AgentStatus>,
    error: Option<String>,
}

impl Entry {
    fn state(&self, lost_after: Duration) -> HostState {
        let since = self.last_ok.unwrap_or(self.known_since).elapsed();
        match self.last_ok {
            Some(_) if since < NOT_READY_AFTER => HostState::Ready,
            _ if since >= lost_after => HostState::Lost,
            _ => HostState::NotReady,
        }
    }
}

/// The registered hosts and what their agents last said.
pub struct Registry {
    hosts: Mutex<BTreeMap<String, Entry>>,
    lost_after: Duration,
    /// The management tool's client configuration for agents (its `dva://mgmt` certificate).
    tls: Arc<rustls::ClientConfig>,
}

/// A placeable host, for the reconciler.
#[derive(Debug, Clone)]
pub struct Placeable {
    pub record: HostRecord,
    pub state: HostState,
    /// Alive units its agent runs.
    pub units: usize,
    /// The appliance of each alive unit its agent runs.
    pub appliances: Vec<String>,
}

impl Registry {
    pub fn new(tls: Arc<rustls::ClientConfig>, lost_after: Duration) -> Registry {
        Registry {
            hosts: Mutex::new(BTreeMap::new()),
            lost_after,
            tls,
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Entry>> {
        self.hosts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Make the registry hold exactly `records` (from the store), keeping what polls learned of
    /// hosts that stay.
    pub fn set(&self, records: Vec<HostRecord>) {
        let mut hosts = self.lock();
        let names: Vec<String> = records.iter().map(|r| r.name.clone()).collect();
        hosts.retain(|n, _| names.contains(n));
        for r in records {
            match hosts.get_mut(&r.name) {
                Some(e) => e.record = r,
                None => {
                    hosts.insert(
                        r.name.clone(),
                        Entry {
                            record: r,
                            known_since: Instant::now(),
                            last_ok: None,
                            last_ok_ms: None,
                            status: None,
                            error: None,
                        },
                    );
                }
            }
        }
    }

    pub fn upsert(&self, record: HostRecord) {
        let mut all: Vec<HostRecord> = self.lock().values().map(|e| e.record.clone()).collect();
        all.retain(|r| r.name != record.name);
        all.push(record);
        self.set(all);
    }

    pub fn remove(&self, name: &str) -> bool {
        self.lock().remove(name).is_some()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    pub fn record(&self, name: &str) -> Option<HostRecord> {
        self.lock().get(name).map(|e| e.record.clone())
    }

    pub fn state(&self, name: &str) -> Option<HostState> {
        self.lock().get(name).map(|e| e.state(self.lost_after))
    }

    pub fn views(&self) -> Vec<HostView> {
        self.lock()
            .values()
            .map(|e| HostView {
                record: e.record.clone(),
                state: e.state(self.lost_after),
                last_seen_ms: e.last_ok_ms,
                units: e
                    .status
                    .as_ref()
                    .map_or(0, |s| s.units.iter().filter(|u| u.alive).count()),
                error: e.error.clone(),
            })
            .collect()
    }

    pub fn placeable(&self) -> Vec<Placeable> {
        self.lock()
            .values()
            .map(|e| {
                let appliances: Vec<String> = e
                    .status
                    .as_ref()
                    .map(|s| {
                        s.units
                            .iter()
                            .filter(|u| u.alive)
                            .map(|u| u.appliance.clone())
                            .collect()
                    })
                    .unwrap_or_default();
                Placeable {
                    record: e.record.clone(),
                    state: e.state(self.lost_after),
                    units: appliances.len(),
                    appliances,
                }
            })
            .collect()
    }

    /// The alive units each ready host's agent last reported: (host, unit).
    pub fn reported_units(&self) -> Vec<(String, AgentUnit)> {
        self.lock()
            .values()
            .filter(|e| e.state(self.lost_after) == HostState::Ready)
            .flat_map(|e| {
                let units = e
                    .status
                    .as_ref()
                    .map(|s| s.units.clone())
                    .unwrap_or_default();
                units
                    .into_iter()
                    .filter(|u| u.alive)
                    .map(|u| (e.record.name.clone(), u))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Poll every agent once (in parallel: one slow agent must not make the others look late).
    pub fn poll(&self) {
        let targets: Vec<(String, SocketAddr)> = self
            .lock()
            .values()
            .map(|e| (e.record.name.clone(), e.record.agent))
            .collect();
        let answers: Vec<(String, Result<AgentStatus, String>)> = std::thread::scope(|s| {
            let handles: Vec<_> = targets
                .iter()
                .map(|(name, addr)| {
                    let tls = self.tls.clone();
                    s.spawn(move || {
                        (
                            name.clone(),
                            agent::call_json::<AgentStatus>(
                                *addr,
                                &tls,
                                "GET",
                                "/v1/status",
                                None,
                                AGENT_TIMEOUT,
                            )
                            .map_err(|e| format!("{e:#}")),
                        )
                    })
                })
                .collect();
            handles.into_iter().filter_map(|h| h.join().ok()).collect()
        });
        let mut hosts = self.lock();
        for (name, answer) in answers {
            let Some(e) = hosts.get_mut(&name) else {
                continue;
            };
            match answer {
                Ok(st) => {
                    e.last_ok = Some(Instant::now());
                    e.last_ok_ms = Some(crate::model::now_ms());
                    e.status = Some(st);
                    e.error = None;
                }
                Err(why) => e.error = Some(why),
            }
        }
    }

    /// What the last poll of `host` said of the unit, and when that poll answered.
    fn polled(&self, host: &str, u: &UnitLaunch, p: UnitProcess) -> Polled {
        let hosts = self.lock();
        let Some(e) = hosts.get(host) else {
            return Polled::NoHost;
        };
        if e.state(self.lost_after) == HostState::Lost {
            return Polled::Lost;
        }
        let (Some(st), Some(at)) = (&e.status, e.last_ok) else {
            return Polled::Unknown;
        };
        match st
            .units
            .iter()
            .find(|x| x.appliance == u.appliance && x.id == u.id && x.pid == p.pid)
        {
            Some(x) => Polled::Seen(x.alive),
            None => Polled::Absent(at),
        }
    }
}

enum Polled {
    NoHost,
    Lost,
    Unknown,
    Seen(bool),
    Absent(Instant),
}

/// Units on agents' hosts through their agents; the rest on this machine.
pub struct HostProvisioner {
    /// What runs units on this machine (and in a lab's namespaces).
    pub local: Box<dyn Provisioner>,
    pub registry: Arc<Registry>,
    /// When we asked an agent to start a pid (an agent's list older than that may not have it).
    started: Mutex<HashMap<(String, u32), Instant>>,
}

impl HostProvisioner {
    pub fn new(local: Box<dyn Provisioner>, registry: Arc<Registry>) -> HostProvisioner {
        HostProvisioner {
            local,
            registry,
            started: Mutex::new(HashMap::new()),
        }
    }

    fn agent(&self, u: &UnitLaunch) -> Option<SocketAddr> {
        self.registry.record(&u.host).map(|r| r.agent)
    }

    fn unit_path(u: &UnitLaunch, op: &str) -> String {
        format!("/v1/units/{}/{}/{op}", u.appliance, u.id)
    }

    fn signal(&self, addr: SocketAddr, p: UnitProcess, u: &UnitLaunch, op: &str) {
        if self.registry.state(&u.host) == Some(HostState::Lost) {
            // Unreachable for a while: a call would only wait out its timeout (the reconciler
            // waits with it). Its units are stopped when it comes back (fencing).
            tracing::debug!(host = %u.host, unit = u.id, "{op}: host lost, not asked");
            return;
        }
        let body = UnitRef {
            pid: p.pid,
            start: p.start,
        };
        let sent = serde_json::to_vec(&body)
            .map_err(anyhow::Error::from)
            .and_then(|b| {
                agent::call_json::<serde_json::Value>(
                    addr,
                    &self.registry.tls,
                    "POST",
                    &Self::unit_path(u, op),
                    Some(&b),
                    AGENT_TIMEOUT,
                )
            });
        if let Err(e) = sent {
            tracing::warn!(host = %u.host, unit = u.id, "{op} through the agent failed: {e:#}");
        }
    }
}

impl Provisioner for HostProvisioner {
    fn start(&self, u: &UnitLaunch) -> anyhow::Result<UnitProcess> {
        let Some(addr) = self.agent(u) else {
            return self.local.start(u);
        };
        let creds = u
            .credentials
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("unit {} has no credentials to start with", u.id))?;
        let req = StartRequest {
            appliance: u.appliance.clone(),
            id: u.id,
            role: u.role,
            managers: u.managers.clone(),
            listen: u.listen.clone(),
            cert_pem: creds.cert_pem.clone(),
            key_pem: creds.key_pem.clone(),
            ca_pem: creds.ca_pem.clone(),
        };
        let asked = Instant::now();
        let r: UnitRef = agent::call_json(
            addr,
            &self.registry.tls,
            "POST",
            "/v1/units",
            Some(&serde_json::to_vec(&req)?),
            AGENT_TIMEOUT,
        )
        .map_err(|e| {
            anyhow::anyhow!(
                "starting {} unit {} on host {} (agent {addr}): {e:#}",
                u.role.as_str(),
                u.id,
                u.host
            )
        })?;
        if let Ok(mut s) = self.started.lock() {
            s.retain(|_, t| t.elapsed() < Duration::from_secs(60));
            s.insert((u.host.clone(), r.pid), asked);
        }
        Ok(UnitProcess {
            pid: r.pid,
            start: r.start,
        })
    }

    fn stop(&self, p: UnitProcess, u: &UnitLaunch) {
        match self.agent(u) {
            Some(addr) => self.signal(addr, p, u, "stop"),
            None => self.local.stop(p, u),
        }
    }

    fn kill(&self, p: UnitProcess, u: &UnitLaunch) {
        match self.agent(u) {
            Some(addr) => self.signal(addr, p, u, "kill"),
            None => self.local.kill(p, u),
        }
    }

    /// From the last poll, not a call per unit and pass: the reconciler asks every 200 ms.
    fn alive(&self, p: UnitProcess, u: &UnitLaunch) -> bool {
        let asked = self
            .started
            .lock()
            .ok()
            .and_then(|s| s.get(&(u.host.clone(), p.pid)).copied());
        match self.registry.polled(&u.host, u, p) {
            Polled::NoHost => self.local.alive(p, u),
            // A lost host's units are dead to us: they are replaced elsewhere.
            Polled::Lost => false,
            // No answer yet: the unit is taken as running until the host is lost.
            Polled::Unknown => true,
            Polled::Seen(alive) => alive,
            // Started after that poll: the next one will tell.
            Polled::Absent(at) => asked.is_some_and(|t| t >= at),
        }
    }

    fn find(&self, u: &UnitLaunch) -> Vec<UnitProcess> {
        let Some(addr) = self.agent(u) else {
            return self.local.find(u);
        };
        if self.registry.state(&u.host) == Some(HostState::Lost) {
            return Vec::new();
        }
        agent::call_json::<Vec<UnitRef>>(
            addr,
            &self.registry.tls,
            "POST",
            &Self::unit_path(u, "find"),
            Some(b"{}"),
            AGENT_TIMEOUT,
        )
        .map(|v| {
            v.into_iter()
                .map(|r| UnitProcess {
                    pid: r.pid,
                    start: r.start,
                })
                .collect()
        })
        .unwrap_or_default()
    }

    fn control_get(
        &self,
        u: &UnitLaunch,
        path: &str,
        timeout: Duration,
    ) -> std::io::Result<(u16, String)> {
        let Some(addr) = self.agent(u) else {
            return self.local.control_get(u, path, timeout);
        };
        let target = format!("{}{path}", Self::unit_path(u, "control"));
        agent::call(addr, &self.registry.tls, "GET", &target, None, timeout)
            .map_err(|e| std::io::Error::other(format!("agent of host {}: {e:#}", u.host)))
    }
}

/// How often the registry is read again from the store (another replica may have registered a
/// host while this one did not lead).
const RELOAD_EVERY: Duration = Duration::from_secs(5);

/// The heartbeat: poll every agent each [`POLL_EVERY`] while this replica leads.
pub(crate) fn poll_loop(inner: &crate::core::Inner) {
    let mut loaded: Option<Instant> = None;
    while !inner.stop.load(std::sync::atomic::Ordering::Acquire) {
        let started = Instant::now();
        let leads = inner.leadership.as_ref().is_none_or(|l| l.term().is_some());
        if leads {
            if loaded.is_none_or(|t| t.elapsed() >= RELOAD_EVERY) {
                match inner.store.load_hosts() {
                    Ok(h) => inner.registry.set(h),
                    Err(e) => tracing::warn!("reading the hosts: {e:#}"),
                }
                loaded = Some(Instant::now());
            }
            inner.registry.poll();
        }
        std::thread::sleep(POLL_EVERY.saturating_sub(started.elapsed()));
    }
}

/// A join token made by `POST /v1/join-tokens`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinToken {
    pub token: String,
    pub expires_ms: u64,
}

impl crate::core::Mgmt {
    /// `GET /v1/hosts`.
    pub fn hosts(&self) -> Vec<HostView> {
        self.inner.registry.views()
    }

    /// `DELETE /v1/hosts/{name}`: forget a host (its units, if it still runs any, are replaced
    /// elsewhere as those of a lost host).
    pub fn remove_host(&self, name: &str) -> Result<(), crate::model::ApiError> {
        use crate::model::ApiError;
        if self.inner.registry.record(name).is_none() {
            return Err(ApiError::NotFound(format!("no host named {name:?}")));
        }
        self.inner
            .store
            .remove_host(name)
            .map_err(|e| ApiError::Internal(format!("store: {e:#}")))?;
        self.inner.registry.remove(name);
        Ok(())
    }

    /// `POST /v1/join-tokens`: a fresh one-time token, valid [`JOIN_TOKEN_TTL`].
    pub fn create_join_token(&self) -> Result<JoinToken, crate::model::ApiError> {
        use crate::model::ApiError;
        let mut raw = [0u8; 24];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut raw))
            .map_err(|e| ApiError::Internal(format!("reading /dev/urandom: {e}")))?;
        let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        let expires_ms = crate::model::now_ms() + JOIN_TOKEN_TTL.as_millis() as u64;
        self.inner
            .store
            .save_join_token(&token_hash(&token), &JoinTokenRecord { expires_ms })
            .map_err(|e| ApiError::Internal(format!("store: {e:#}")))?;
        Ok(JoinToken { token, expires_ms })
    }

    /// Use up a join token: whether it was a valid, unexpired one.
    pub fn use_join_token(&self, token: &str) -> bool {
        match self.inner.store.take_join_token(&token_hash(token)) {
            Ok(Some(t)) => t.expires_ms > crate::model::now_ms(),
            Ok(None) => false,
            Err(e) => {
                tracing::warn!("reading a join token: {e:#}");
                false
            }
        }
    }

    /// `POST /v1/hosts/{name}/join` (the caller's token was checked): register the host and
    /// issue its agent's certificate, naming the agent's address.
    pub fn join(&self, name: &str, body: &str) -> Result<JoinAnswer, crate::model::ApiError> {
        use crate::model::ApiError;
        check_name(name).map_err(ApiError::Invalid)?;
        let req: JoinRequest = serde_json::from_str(body)
            .map_err(|e| ApiError::BadRequest(format!("join request: {e}")))?;
        if req.agent.ip().is_unspecified() || req.backplane.is_unspecified() {
            return Err(ApiError::Invalid(
                "the agent's and the backplane's addresses must be ones other machines reach \
                 (not 0.0.0.0 or ::)"
                    .into(),
            ));
        }
        let issued = self
            .inner
            .pki
            .issue_agent(name, req.agent.ip())
            .map_err(|e| ApiError::Internal(format!("{e:#}")))?;
        let record = HostRecord {
            name: name.to_string(),
            agent: req.agent,
            backplane: req.backplane,
            labels: req.labels,
            cpus: req.cpus,
            memory_mb: req.memory_mb,
            joined_ms: crate::model::now_ms(),
        };
        self.inner
            .store
            .save_host(&record)
            .map_err(|e| ApiError::Internal(format!("store: {e:#}")))?;
        tracing::info!(host = name, agent = %record.agent, "host joined");
        self.inner.registry.upsert(record);
        Ok(JoinAnswer {
            ca_pem: issued.ca_pem,
            cert_pem: issued.cert_pem,
            key_pem: issued.key_pem,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{FileStore, Store};

    fn record(name: &str, labels: &[(&str, &str)]) -> HostRecord {
        HostRecord {
            name: name.into(),
            agent: "198.19.0.2:7070".parse().unwrap(),
            backplane: "198.19.0.2".parse().unwrap(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            cpus: 2,
            memory_mb: 1024,
            joined_ms: 1,
        }
    }

    #[test]
    fn host_states_follow_the_polls() {
        let e = |last: Option<Duration>, known: Duration| Entry {
            record: record("h", &[]),
            known_since: Instant::now() - known,
            last_ok: last.map(|d| Instant::now() - d),
            last_ok_ms: None,
            status: None,
            error: None,
        };
        let lost = Duration::from_secs(10);
        let s = |x: Entry| x.state(lost);
        assert_eq!(s(e(Some(Duration::ZERO), Duration::ZERO)), HostState::Ready);
        assert_eq!(
            s(e(Some(Duration::from_secs(3)), lost)),
            HostState::NotReady
        );
        assert_eq!(s(e(Some(Duration::from_secs(11)), lost)), HostState::Lost);
        // Never answered: not ready, then lost once it has been known that long.
        assert_eq!(s(e(None, Duration::ZERO)), HostState::NotReady);
        assert_eq!(s(e(None, Duration::from_secs(11))), HostState::Lost);
    }

    #[test]
    fn names_and_token_hashes() {
        for ok in ["dp1", "fw-1.example", "a_b"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", ".a", "a/b", "a b", &"x".repeat(64)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        let h = token_hash("secret");
        assert_eq!(h.len(), 64);
        assert_ne!(h, token_hash("secret2"));
        assert!(record("f", &[("dispatcher", "true")]).is_dispatcher());
        assert!(!record("f", &[("dispatcher", "yes")]).is_dispatcher());
    }

    /// Hosts and join tokens in the file store: private files, a token good once.
    #[test]
    fn the_file_store_keeps_hosts_and_one_time_tokens() {
        use std::os::unix::fs::MetadataExt;
        let dir = std::env::temp_dir().join(format!("dva-hosts-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = FileStore::open(&dir).unwrap();
        store.save_host(&record("b", &[])).unwrap();
        store
            .save_host(&record("a", &[("dispatcher", "true")]))
            .unwrap();
        let hosts = store.load_hosts().unwrap();
        assert_eq!(
            hosts.iter().map(|h| h.name.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(hosts[0], record("a", &[("dispatcher", "true")]));
        let mode = std::fs::metadata(dir.join("hosts/a.json")).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        store.remove_host("a").unwrap();
        store.remove_host("a").unwrap();
        assert_eq!(store.load_hosts().unwrap().len(), 1);

        let t = JoinTokenRecord { expires_ms: 5 };
        store.save_join_token(&token_hash("t"), &t).unwrap();
        assert!(store.take_join_token(&token_hash("x")).unwrap().is_none());
        assert_eq!(
            store
                .take_join_token(&token_hash("t"))
                .unwrap()
                .map(|t| t.expires_ms),
            Some(5)
        );
        assert!(store.take_join_token(&token_hash("t")).unwrap().is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
