//! The etcd backend of `dva serve --store etcd://HOST:PORT[,...]`, for several replicas of the
//! management tool: the appliance records ([`EtcdStore`]), the shared API token, and the election
//! of the one replica that reconciles ([`Leadership`]).
//!
//! Keys (all under [`PREFIX`]):
//! * `/dva/appliances/NAME`: the record (JSON, events included), as the file store keeps it;
//! * `/dva/corrupt/NAME/<unix ms>`: a record that did not parse, set aside for a human;
//! * `/dva/leader`: the leader's API address (JSON), attached to its lease;
//! * `/dva/token`: the API token every replica accepts (see [`EtcdLink::share_token`]).
//! * `/dva/pki/ca`: the installation CA every replica issues certificates with.
//!
//! etcd-client is async; the rest of the management tool is std threads. An [`EtcdLink`] owns a
//! current-thread tokio runtime driven by one dedicated thread (`etcd`), which also runs the
//! election task; the store's callers block on their call with [`tokio::runtime::Handle::block_on`]
//! (the dedicated thread drives the I/O), each call bounded by [`CALL_TIMEOUT`].
//!
//! Election: each replica holds a lease of [`LEASE_TTL`] kept alive every [`TICK`], and creates
//! `/dva/leader` with it in a txn that succeeds only if the key does not exist (create_revision
//! == 0). The holder leads; the key's create revision is its term. A dead leader's lease expires
//! after the TTL, the key goes with it, and the next replica's txn wins. Fencing, twice: a leader
//! counts itself leader only until its lease could have expired (the time it sent its last
//! acknowledged keep-alive plus the TTL etcd granted), so one that cannot reach etcd stops
//! reconciling before anyone else can be elected; and every write of the store is a txn that
//! compares `/dva/leader`'s lease with this replica's, so a deposed leader's late write is refused
//! by etcd itself.

use std::future::Future;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity,
    LeaseKeepAliveStream, LeaseKeeper, PutOptions, TlsOptions, Txn, TxnOp, TxnOpResponse,
};
use serde::{Deserialize, Serialize};

use crate::model::{now_ms, ApplianceRecord};
use crate::store::{CorruptRecord, EtcdTls, Loaded, Store};

pub const PREFIX: &str = "/dva/";
const APPLIANCES: &str = "/dva/appliances/";
const CORRUPT: &str = "/dva/corrupt/";
const HOSTS: &str = "/dva/hosts/";
const JOIN_TOKENS: &str = "/dva/join-tokens/";
const LEADER_KEY: &str = "/dva/leader";
const TOKEN_KEY: &str = "/dva/token";
/// The installation CA, certificate and key (see [`EtcdLink::share_ca`]).
const CA_KEY: &str = "/dva/pki/ca";

/// The leader's lease: a dead leader is replaced this long (plus one [`TICK`]) after it died.
pub const LEASE_TTL: Duration = Duration::from_secs(2);
/// How often the lease is renewed and the leader key checked.
const TICK: Duration = Duration::from_millis(300);
/// Longest any one etcd call may take (a member that died must not hang the API or reconciler).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one attempt of a call may take before it is made again (see [`EtcdLink::call`]).
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(900);

/// A connection to one etcd cluster, with the runtime that drives it.
pub struct EtcdLink {
    handle: tokio::runtime::Handle,
    client: Client,
    /// Dropped with the link: ends the runtime's thread.
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl EtcdLink {
    /// Connect to `endpoints` (`HOST:PORT`), over TLS with `tls`, checking that the cluster
    /// answers.
    pub fn connect(endpoints: &[String], tls: Option<&EtcdTls>) -> anyhow::Result<Arc<EtcdLink>> {
        // Read the credentials before anything starts: a missing file is the operator's error,
        // named as such, not a connection failure.
        let tls = tls.map(tls_options).transpose()?;
        let secure = tls.is_some();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the etcd client's runtime")?;
        let handle = rt.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("etcd".into())
            .spawn(move || {
                rt.block_on(async {
                    let _ = stopped.await;
                })
            })
            .context("starting the etcd thread")?;
        let scheme = if secure { "https" } else { "http" };
        let urls: Vec<String> = endpoints
            .iter()
            .map(|e| format!("{scheme}://{e}"))
            .collect();
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(CALL_TIMEOUT)
            // Find a dead member's connection quickly, so calls go to the live ones.
            .with_keep_alive(Duration::from_secs(1), Duration::from_secs(1))
            .with_keep_alive_while_idle(true);
        if let Some(tls) = tls {
            opts = opts.with_tls(tls);
        }
        let link_of = |client| {
            Arc::new(EtcdLink {
                handle: handle.clone(),
                client,
                _stop: stop,
            })
        };
        let client = block(&handle, "connecting", Client::connect(urls, Some(opts)))
            .with_context(|| format!("etcd at {}", endpoints.join(",")))?;
        let link = link_of(client);
        // Connecting is lazy: one read proves the cluster is there (and has a quorum).
        let hint = if secure {
            "check that --etcd-cafile signed the members' certificates, which must name the \
             addresses given, and that the cluster accepts --etcd-certfile"
        } else {
            "a cluster that serves TLS needs --etcd-cafile (and --etcd-certfile/--etcd-keyfile \
             when it asks clients for certificates)"
        };
        link.call("reading /dva/", |mut c| async move {
            c.get(PREFIX, Some(GetOptions::new().with_count_only()))
                .await
        })
        .with_context(|| format!("etcd at {} ({hint})", endpoints.join(",")))?;
        Ok(link)
    }

    /// Run one etcd call from a std thread, bounded by [`CALL_TIMEOUT`]. `op` makes the call
    /// from a client handle, and is made again when an attempt fails in transport: the client
    /// balances over every member and, for a while after one dies, may still send to it (its
    /// answer: Unavailable, the request never reached a member that could apply it). Every call
    /// here is safe to send twice (whole-record puts, guarded txns, reads).
    fn call<T, Fut>(&self, what: &str, mut op: impl FnMut(Client) -> Fut) -> anyhow::Result<T>
    where
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = tokio::time::Instant::now() + CALL_TIMEOUT;
        let client = self.client.clone();
        let attempts = async move {
            let mut backoff = Duration::from_millis(50);
            loop {
                // A request sent on the connection to a member that just died gets no answer
                // until the keep-alive notices (~2 s): an attempt is given up sooner and made
                // again, which the balancer sends to a live member.
                let attempt = tokio::time::timeout(ATTEMPT_TIMEOUT, op(client.clone())).await;
                let retry = match &attempt {
                    Err(_) => true,
                    Ok(Err(e)) => transient(e),
                    Ok(Ok(_)) => false,
                };
                if !retry || tokio::time::Instant::now() + backoff >= deadline {
                    return match attempt {
                        Ok(r) => r,
                        Err(_) => Err(etcd_client::Error::IoError(std::io::Error::from(
                            std::io::ErrorKind::TimedOut,
                        ))),
                    };
                }
                tracing::debug!("etcd: {what}: no answer from a member; trying another");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
        };
        self.handle
            .block_on(async { tokio::time::timeout_at(deadline, attempts).await })
            .map_err(|_| anyhow::anyhow!("etcd: {what}: no answer within {CALL_TIMEOUT:?}"))?
            .with_context(|| format!("etcd: {what}"))
    }

    /// The API token every replica accepts: the one already in etcd, or else `candidate` (this
    /// replica's own), stored there for the others. Created with a txn, so two replicas starting
    /// at once agree on one.
    pub fn share_token(&self, candidate: &str) -> anyhow::Result<String> {
        let token = self.share(TOKEN_KEY, candidate, "the API token")?;
        let token = token.trim();
        if token.len() < 32 {
            bail!("the API token in etcd ({TOKEN_KEY}) is shorter than 32 characters");
        }
        Ok(token.to_string())
    }

    /// The installation's CA (certificate and key, PEM) every replica issues unit certificates
    /// with: the one already in etcd, or else `candidate` (this replica's). One CA, so a replica
    /// that takes over is trusted by the units and managers the previous leader started.
    pub fn share_ca(&self, candidate: &str) -> anyhow::Result<String> {
        self.share(CA_KEY, candidate, "the installation CA")
    }

    /// The value at `key`, set to `candidate` first if there is none (a txn: replicas starting
    /// at once agree on one).
    fn share(&self, key: &str, candidate: &str, what: &str) -> anyhow::Result<String> {
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, candidate, None)])
            .or_else([TxnOp::get(key, None)]);
        let resp = self.call(&format!("sharing {what}"), |mut c| {
            let txn = txn.clone();
            async move { c.txn(txn).await }
        })?;
        if resp.succeeded() {
            return Ok(candidate.to_string());
        }
        for op in resp.op_responses() {
            if let TxnOpResponse::Get(get) = op {
                if let Some(kv) = get.kvs().first() {
                    let v = kv.value_str().with_context(|| format!("{what} in etcd"))?;
                    return Ok(v.to_string());
                }
            }
        }
        bail!("etcd answered the txn for {what} without it")
    }

    /// Start campaigning for leadership, advertising `api` (the address other replicas forward
    /// API calls to). The outcome is in `leadership`, kept current by a task on the etcd thread.
    pub fn campaign(&self, leadership: Arc<Leadership>, api: String) {
        let value = serde_json::to_string(&LeaderValue { api }).unwrap_or_default();
        self.handle
            .spawn(elect(self.client.clone(), leadership, value));
    }

    /// Give up the lease now (a graceful stop), so another replica leads without waiting for it
    /// to expire.
    pub fn resign(&self, leadership: &Leadership) {
        if let Some(lease) = leadership.lease() {
            leadership.set(State::Unknown);
            let _ = self.call("revoking the lease", |mut c| async move {
                c.lease_revoke(lease).await
            });
        }
    }
}

/// An error of the way to a member rather than of the call: another member may answer.
/// The client's TLS settings from the operator's PEM files: the members are checked against
/// `ca` (and must name the address dialled), and present `identity` when the cluster asks.
fn tls_options(tls: &EtcdTls) -> anyhow::Result<TlsOptions> {
    let read = |what: &str, path: &std::path::Path| {
        std::fs::read(path).with_context(|| format!("reading etcd's {what} {}", path.display()))
    };
    let mut opts = TlsOptions::new().ca_certificate(Certificate::from_pem(read("CA", &tls.ca)?));
    if let Some((cert, key)) = &tls.identity {
        opts = opts.identity(Identity::from_pem(
            read("client certificate", cert)?,
            read("client key", key)?,
        ));
    }
    Ok(opts)
}

fn transient(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(s) => match s.code() {
            tonic::Code::Unavailable => true,
            // A connection that broke under the request (to a member that just died) comes back
            // as Unknown "transport error", the transport's error as its source.
            tonic::Code::Unknown => std::error::Error::source(s)
                .is_some_and(|e| e.downcast_ref::<tonic::transport::Error>().is_some()),
            _ => false,
        },
        _ => false,
    }
}

fn block<T>(
    handle: &tokio::runtime::Handle,
    what: &str,
    fut: impl Future<Output = Result<T, etcd_client::Error>>,
) -> anyhow::Result<T> {
    handle
        .block_on(async { tokio::time::timeout(CALL_TIMEOUT, fut).await })
        .map_err(|_| anyhow::anyhow!("etcd: {what}: no answer within {CALL_TIMEOUT:?}"))?
        .with_context(|| format!("etcd: {what}"))
}

/// What `/dva/leader` holds.
#[derive(Debug, Serialize, Deserialize)]
struct LeaderValue {
    /// `HOST:PORT` of the leader's API.
    api: String,
}

/// Who leads, as this replica knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leader {
    /// This replica (also: every store that is not etcd).
    Me,
    /// Another replica, whose API is at this `HOST:PORT`.
    Other(String),
    /// Nobody known (an election in progress, or etcd unreachable).
    Unknown,
}

#[derive(Debug, Clone)]
enum State {
    Unknown,
    Following(String),
    Leading {
        /// The leader key's create revision: unique to this reign.
        term: i64,
        lease: i64,
        /// Past this, the lease may have expired: stop acting as leader.
        until: Instant,
    },
}

/// This replica's view of the election, shared by the election task, the reconciler (which runs
/// only while [`Leadership::term`] is `Some`), the store (whose writes carry the lease) and the
/// API (which forwards to the leader).
pub struct Leadership {
    state: Mutex<State>,
    /// Notified on every [`Leadership::set`] (a renewal too), for [`Leadership::settled`].
    changed: Condvar,
}

impl Default for Leadership {
    fn default() -> Self {
        Leadership {
            state: Mutex::new(State::Unknown),
            changed: Condvar::new(),
        }
    }
}

impl Leadership {
    fn get(&self) -> State {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set(&self, new: State) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match (&*st, &new) {
            (State::Leading { term: a, .. }, State::Leading { term: b, .. }) if a == b => {}
            (_, State::Leading { term, .. }) => {
                tracing::info!(term, "leadership: this replica leads now")
            }
            (State::Following(a), State::Following(b)) if a == b => {}
            (_, State::Following(api)) => {
                tracing::info!(leader = %api, "leadership: following the leader")
            }
            (State::Unknown, State::Unknown) => {}
            (_, State::Unknown) => {
                tracing::info!("leadership: no leader known (lost or in election)")
            }
        }
        *st = new;
        self.changed.notify_all();
    }

    /// The leader, waiting up to `wait` while nobody is known. An etcd member's death can hold up
    /// lease renewals for as long as etcd takes to elect its own leader (a second or two, about
    /// the lease's TTL): meanwhile this replica cannot be sure it still leads, and a caller is
    /// better served by an answer a little late than by a refusal.
    pub fn settled(&self, wait: Duration) -> Leader {
        let deadline = Instant::now() + wait;
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let now = Instant::now();
            let leader = match &*st {
                State::Leading { until, .. } if now < *until => Leader::Me,
                State::Leading { .. } | State::Unknown => Leader::Unknown,
                State::Following(api) => Leader::Other(api.clone()),
            };
            if !matches!(leader, Leader::Unknown) || now >= deadline {
                return leader;
            }
            // `until` passing is no event: look again at least every tick.
            let nap = (deadline - now).min(TICK);
            st = self
                .changed
                .wait_timeout(st, nap)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    pub fn leader(&self) -> Leader {
        self.settled(Duration::ZERO)
    }

    /// The current term while this replica leads and its lease is surely alive.
    pub fn term(&self) -> Option<i64> {
        match self.get() {
            State::Leading { term, until, .. } if Instant::now() < until => Some(term),
            _ => None,
        }
    }

    /// The lease this replica leads with (whether or not it is still alive: etcd judges that).
    fn lease(&self) -> Option<i64> {
        match self.get() {
            State::Leading { lease, .. } => Some(lease),
            _ => None,
        }
    }
}

/// The election task: get a lease, keep it alive, and hold or watch `/dva/leader`; on losing the
/// lease, start over with a new one.
async fn elect(mut client: Client, l: Arc<Leadership>, value: String) {
    loop {
        let granted_at = Instant::now();
        let ttl = LEASE_TTL.as_secs() as i64;
        let lease = match tokio::time::timeout(CALL_TIMEOUT, client.lease_grant(ttl, None)).await {
            Ok(Ok(r)) => r.id(),
            Ok(Err(e)) => {
                tracing::warn!("leadership: no lease from etcd: {e}");
                l.set(State::Unknown);
                tokio::time::sleep(TICK).await;
                continue;
            }
            Err(_) => {
                tracing::warn!("leadership: no lease from etcd within {CALL_TIMEOUT:?}");
                l.set(State::Unknown);
                continue;
            }
        };
        let mut until = granted_at + LEASE_TTL;
        let mut keeper: Option<(LeaseKeeper, LeaseKeepAliveStream)> = None;
        loop {
            if keeper.is_none() {
                // Short attempts: a stream that lands on a dying member is given up for another
                // well within the lease's TTL.
                keeper = tokio::time::timeout(ATTEMPT_TIMEOUT, client.lease_keep_alive(lease))
                    .await
                    .ok()
                    .and_then(Result::ok);
            }
            if let Some((k, stream)) = keeper.as_mut() {
                let sent = Instant::now();
                let renewed = tokio::time::timeout(Duration::from_secs(1), async {
                    k.keep_alive().await?;
                    stream.message().await
                })
                .await;
                match renewed {
                    Ok(Ok(Some(r))) if r.ttl() > 0 => {
                        until = sent + Duration::from_secs(r.ttl() as u64);
                    }
                    // TTL 0: etcd let the lease expire.
                    Ok(Ok(Some(_))) => break,
                    // The stream broke (a member died): open a new one on the next tick.
                    _ => keeper = None,
                }
            }
            if Instant::now() >= until {
                // Renewals stalled past the lease's TTL (etcd electing its own leader, a member
                // dying, a loaded machine): this replica can no longer prove it leads, so it stops
                // acting as leader at once; but etcd may well have kept the lease (a new etcd
                // leader even extends every lease), so it keeps renewing this one rather than
                // take a new lease that would find its own old reign in `/dva/leader` and wait
                // it out. Only etcd's word that the lease expired (TTL 0) starts over.
                if matches!(l.get(), State::Leading { .. } | State::Following(_)) {
                    tracing::warn!(
                        lease,
                        "leadership: lease not renewed in time (etcd unreachable or slow); \
                         renewing it"
                    );
                }
                l.set(State::Unknown);
            } else {
                lead_or_follow(&mut client, &l, &value, lease, until).await;
            }
            tokio::time::sleep(TICK).await;
        }
        tracing::warn!(lease, "leadership: lease expired in etcd; taking a new one");
        l.set(State::Unknown);
    }
}

async fn lead_or_follow(
    client: &mut Client,
    l: &Leadership,
    value: &str,
    lease: i64,
    until: Instant,
) {
    let txn = Txn::new()
        .when([Compare::create_revision(LEADER_KEY, CompareOp::Equal, 0)])
        .and_then([TxnOp::put(
            LEADER_KEY,
            value,
            Some(PutOptions::new().with_lease(lease)),
        )])
        .or_else([TxnOp::get(LEADER_KEY, None)]);
    // No answer: the state stays, and a leader's `until` runs out by itself.
    let Ok(Ok(resp)) = tokio::time::timeout(ATTEMPT_TIMEOUT, client.txn(txn)).await else {
        return;
    };
    if resp.succeeded() {
        let term = resp.header().map_or(0, |h| h.revision());
        return l.set(State::Leading { term, lease, until });
    }
    for op in resp.op_responses() {
        let TxnOpResponse::Get(get) = op else {
            continue;
        };
        // Gone between the compare and the get cannot happen in one txn; an empty answer means
        // nothing to learn this tick.
        let Some(kv) = get.kvs().first() else {
            return;
        };
        if kv.lease() == lease {
            let term = kv.create_revision();
            return l.set(State::Leading { term, lease, until });
        }
        // Our own address under another lease: an earlier reign of this replica (a lease it
        // gave up on, or a previous run at the same address) that etcd has not expired yet.
        // Following it would forward calls to ourselves; nobody leads until it expires.
        if kv.value() == value.as_bytes() {
            return l.set(State::Unknown);
        }
        match serde_json::from_slice::<LeaderValue>(kv.value()) {
            Ok(v) => l.set(State::Following(v.api)),
            Err(e) => {
                tracing::warn!("leadership: {LEADER_KEY} holds no leader address ({e})");
                l.set(State::Unknown);
            }
        }
    }
}

/// Appliance records in etcd, one key each (`/dva/appliances/NAME`).
pub struct EtcdStore {
    link: Arc<EtcdLink>,
    /// With several replicas: writes are accepted only from the leader (see the module doc).
    /// Without: a plain store (tools, tests).
    leadership: Option<Arc<Leadership>>,
}

impl EtcdStore {
    pub fn new(link: Arc<EtcdLink>, leadership: Option<Arc<Leadership>>) -> EtcdStore {
        EtcdStore { link, leadership }
    }

    fn key(name: &str) -> String {
        format!("{APPLIANCES}{name}")
    }

    /// Apply `ops` at once, only if this replica still holds the leader key (when it campaigns).
    fn commit(&self, what: &str, ops: Vec<TxnOp>) -> anyhow::Result<()> {
        let txn = match &self.leadership {
            None => Txn::new().and_then(ops),
            Some(l) => {
                let Some(lease) = l.lease() else {
                    bail!("{what}: this replica does not lead (writes go through the leader)");
                };
                Txn::new()
                    .when([Compare::lease(LEADER_KEY, CompareOp::Equal, lease)])
                    .and_then(ops)
            }
        };
        let resp = self.link.call(what, |mut c| {
            let txn = txn.clone();
            async move { c.txn(txn).await }
        })?;
        if !resp.succeeded() {
            bail!("{what}: refused, this replica lost the leadership (its lease no longer holds {LEADER_KEY})");
        }
        Ok(())
    }
}

impl Store for EtcdStore {
    fn load_all(&self) -> anyhow::Result<Loaded> {
        let resp = self
            .link
            .call("reading the appliances", |mut c| async move {
                c.get(APPLIANCES, Some(GetOptions::new().with_prefix()))
                    .await
            })?;
        let mut out = Loaded::default();
        for kv in resp.kvs() {
            let name = String::from_utf8_lossy(&kv.key()[APPLIANCES.len()..]).into_owned();
            match serde_json::from_slice::<ApplianceRecord>(kv.value()) {
                Ok(rec) if rec.name == name => out.records.push(rec),
                Ok(rec) => {
                    let why = format!("it holds appliance {:?}, not {name:?}", rec.name);
                    out.corrupt.push(self.set_aside(&name, &why));
                }
                Err(e) => out.corrupt.push(self.set_aside(&name, &e.to_string())),
            }
        }
        out.records.sort_by(|a, b| a.name.cmp(&b.name));
        out.corrupt.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Moved to `/dva/corrupt/NAME/<unix ms>` in one txn (copy and delete).
    fn set_aside(&self, name: &str, why: &str) -> CorruptRecord {
        let key = Self::key(name);
        let aside = format!("{CORRUPT}{name}/{}", now_ms());
        let moved = self
            .link
            .call("reading a record to set aside", |mut c| {
                let key = key.clone();
                async move { c.get(key, None).await }
            })
            .and_then(|resp| {
                let value = resp.kvs().first().map(|kv| kv.value().to_vec());
                let Some(value) = value else {
                    bail!("it is gone");
                };
                self.commit(
                    "setting a record aside",
                    vec![
                        TxnOp::put(aside.as_str(), value, None),
                        TxnOp::delete(key.as_str(), None),
                    ],
                )
            });
        let reason = match moved {
            Ok(()) => format!("stored record {key} is unusable ({why}); set aside as {aside}"),
            Err(e) => {
                format!("stored record {key} is unusable ({why}); setting it aside failed: {e:#}")
            }
        };
        CorruptRecord {
            name: name.to_string(),
            reason,
        }
    }

    fn save(&self, rec: &ApplianceRecord) -> anyhow::Result<()> {
        let text = serde_json::to_vec(rec)?;
        self.commit(
            "saving a record",
            vec![TxnOp::put(Self::key(&rec.name), text, None)],
        )
    }

    fn remove(&self, name: &str) -> anyhow::Result<()> {
        self.commit(
            "removing a record",
            vec![TxnOp::delete(Self::key(name), None)],
        )
    }

    fn load_hosts(&self) -> anyhow::Result<Vec<crate::hosts::HostRecord>> {
        let resp = self.link.call("reading the hosts", |mut c| async move {
            c.get(HOSTS, Some(GetOptions::new().with_prefix())).await
        })?;
        let mut out = Vec::new();
        for kv in resp.kvs() {
            match serde_json::from_slice::<crate::hosts::HostRecord>(kv.value()) {
                Ok(h) => out.push(h),
                Err(e) => tracing::warn!(
                    "host record {}: {e}; ignored",
                    String::from_utf8_lossy(kv.key())
                ),
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn save_host(&self, host: &crate::hosts::HostRecord) -> anyhow::Result<()> {
        let text = serde_json::to_vec(host)?;
        self.commit(
            "saving a host",
            vec![TxnOp::put(format!("{HOSTS}{}", host.name), text, None)],
        )
    }

    fn remove_host(&self, name: &str) -> anyhow::Result<()> {
        self.commit(
            "removing a host",
            vec![TxnOp::delete(format!("{HOSTS}{name}"), None)],
        )
    }

    fn save_join_token(
        &self,
        hash: &str,
        token: &crate::hosts::JoinTokenRecord,
    ) -> anyhow::Result<()> {
        let text = serde_json::to_vec(token)?;
        self.commit(
            "saving a join token",
            vec![TxnOp::put(format!("{JOIN_TOKENS}{hash}"), text, None)],
        )
    }

    fn take_join_token(&self, hash: &str) -> anyhow::Result<Option<crate::hosts::JoinTokenRecord>> {
        let key = format!("{JOIN_TOKENS}{hash}");
        let resp = self.link.call("reading a join token", |mut c| {
            let key = key.clone();
            async move { c.get(key, None).await }
        })?;
        let Some(kv) = resp.kvs().first() else {
            return Ok(None);
        };
        let (value, rev) = (kv.value().to_vec(), kv.mod_revision());
        // Deleted only if unchanged since read: of two joins with one token, one wins.
        let txn = Txn::new()
            .when([Compare::mod_revision(key.as_str(), CompareOp::Equal, rev)])
            .and_then([TxnOp::delete(key.as_str(), None)]);
        let resp = self.link.call("using a join token", |mut c| {
            let txn = txn.clone();
            async move { c.txn(txn).await }
        })?;
        if !resp.succeeded() {
            return Ok(None);
        }
        Ok(serde_json::from_slice(&value).ok())
    }
}

impl EtcdStore {
    /// Put raw bytes as the record of `name` (tests: a corrupt record to be set aside).
    pub fn put_raw(&self, name: &str, bytes: &[u8]) -> anyhow::Result<()> {
        self.commit(
            "writing a raw record",
            vec![TxnOp::put(Self::key(name), bytes, None)],
        )
    }

    /// The records set aside for `name` (keys), oldest first.
    pub fn set_aside_keys(&self, name: &str) -> anyhow::Result<Vec<String>> {
        let prefix = format!("{CORRUPT}{name}/");
        let resp = self.link.call("listing set-aside records", |mut c| {
            let prefix = prefix.clone();
            async move {
                c.get(
                    prefix,
                    Some(GetOptions::new().with_prefix().with_keys_only()),
                )
                .await
            }
        })?;
        Ok(resp
            .kvs()
            .iter()
            .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
            .collect())
    }
}
