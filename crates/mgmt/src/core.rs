//! [`Mgmt`]: every operation on appliances, shared by the HTTP API, `dva run` and `dva demo`.
//!
//! Operations validate and record the desired state (store first, so a crash right after an
//! accepted call loses nothing); the reconciler thread then makes the units match.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use dva_proto::{ApplianceSpec, RuntimeConfig};

use crate::etcd::{EtcdLink, EtcdStore, Leader, Leadership};
use crate::hosts::{HostProvisioner, Registry};
use crate::model::*;
use crate::pki::Pki;
use crate::provision::{LocalProvisioner, Provisioner};
use crate::reconcile::{self, Runtime, Topology};
use crate::store::{CorruptRecord, EtcdTls, FileStore, Store, StoreConfig};

#[derive(Debug, Clone)]
pub struct MgmtOptions {
    /// The replica's own state (`--state`): the API token, and the file store's default home.
    pub state_dir: PathBuf,
    /// Where appliance records live (`--store`; default: files under `state_dir`).
    pub store: StoreConfig,
    /// TLS towards etcd (with an `etcd://` store): `None` speaks plain HTTP/2.
    pub etcd_tls: Option<EtcdTls>,
    /// The lab whose hosts units are placed on; empty with `local`.
    pub lab_prefix: String,
    /// Place every unit on this machine, in the management tool's own network namespace, with
    /// the backplane on loopback: a real server whose devices the spec names (no lab).
    pub local: bool,
    /// Unit run directories (sockets, logs, configs) go under `<run_root>/<lab_prefix><name>/`.
    pub run_root: PathBuf,
    /// The `dva` executable units are started from.
    pub exe: PathBuf,
    /// A registered host whose agent has not answered for this long is lost: its units are
    /// replaced on other hosts (`--host-lost-after`).
    pub host_lost_after: Duration,
}

impl MgmtOptions {
    pub fn new(state_dir: PathBuf, lab_prefix: &str) -> anyhow::Result<MgmtOptions> {
        Ok(MgmtOptions {
            store: StoreConfig::File(state_dir.clone()),
            etcd_tls: None,
            state_dir,
            lab_prefix: lab_prefix.to_string(),
            local: false,
            run_root: PathBuf::from("/run/dva"),
            exe: std::env::current_exe()?,
            host_lost_after: crate::hosts::DEFAULT_LOST_AFTER,
        })
    }

    /// Units on this machine, in the current network namespace (see [`MgmtOptions::local`]).
    pub fn local(state_dir: PathBuf) -> anyhow::Result<MgmtOptions> {
        Ok(MgmtOptions {
            local: true,
            ..MgmtOptions::new(state_dir, "")?
        })
    }
}

/// One appliance as the management tool holds it in memory: the stored record plus what the
/// reconciler learned at run time (never stored: it is re-learned after a restart).
pub(crate) struct Appliance {
    pub rec: ApplianceRecord,
    pub spec: ApplianceSpec,
    pub deleting: bool,
    pub rt: Runtime,
}

/// An appliance whose stored record could not be used at start: listed with status `error` until
/// its spec is applied again or it is deleted.
pub(crate) struct Broken {
    pub error: String,
    pub events: Vec<Event>,
}

impl Broken {
    fn view(&self, name: &str) -> ApplianceView {
        ApplianceView {
            name: name.to_string(),
            status: ApplianceStatus::Error,
            generation: 0,
            config_version: 0,
            dataplanes: DataplaneCounts {
                desired: 0,
                ready: 0,
                draining: 0,
                min: 0,
                max: 0,
            },
            units: Vec::new(),
            error: Some(self.error.clone()),
            backends: Vec::new(),
            spec: String::new(),
        }
    }
}

pub(crate) struct Inner {
    pub opts: MgmtOptions,
    pub store: Box<dyn Store>,
    /// With the etcd store: the election among replicas; only the leader reconciles.
    pub leadership: Option<Arc<Leadership>>,
    pub etcd: Option<Arc<EtcdLink>>,
    pub appliances: Mutex<BTreeMap<String, Appliance>>,
    /// Lock order: `appliances` before `broken`.
    pub broken: Mutex<BTreeMap<String, Broken>>,
    pub stop: AtomicBool,
    pub provisioner: Box<dyn Provisioner>,
    /// The hosts running `dva agent`; when there are any, units are placed on them.
    pub registry: Arc<Registry>,
    /// Reconciler passes over every appliance (exported in `/metrics`).
    pub reconcile_passes: AtomicU64,
    /// When the last pass ended (ms since the epoch): `/readyz` answers from it.
    pub last_pass_ms: AtomicU64,
    /// The installation's CA, which issues every unit's certificate.
    pub pki: Pki,
    /// The tool's own end of the manager channel (its `dva://mgmt` certificate).
    pub link_tls: Arc<rustls::ClientConfig>,
    /// How many times what the API shows may have changed (each write and each reconciler
    /// pass), and the condition watches wait on: a watch sees every state a pass leaves, not
    /// only the ones a poll happens to fall on.
    pub changes: Mutex<u64>,
    pub changed: Condvar,
}

impl Inner {
    pub fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Appliance>> {
        // A panic while holding the lock must not take the API down with it: the data is plain
        // records, still consistent at every await-free step.
        self.appliances.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn broken(&self) -> MutexGuard<'_, BTreeMap<String, Broken>> {
        self.broken.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wake the watches: what they show may have changed.
    pub fn notify(&self) {
        *self.changes.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.changed.notify_all();
    }
}

#[derive(Clone)]
pub struct Mgmt {
    pub(crate) inner: Arc<Inner>,
    reconciler: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl Mgmt {
    /// Open the store (adopting the units of every stored appliance) and start the reconciler.
    /// With the etcd store, nothing is adopted or reconciled until this replica leads (see
    /// [`Mgmt::campaign`]).
    /// Units go on agents' hosts once any registered, or on this machine with
    /// [`MgmtOptions::local`]; for a lab's hosts, see [`Mgmt::open_in`].
    pub fn open(opts: MgmtOptions) -> anyhow::Result<Mgmt> {
        let local = Box::new(LocalProvisioner::new(opts.exe.clone()));
        Mgmt::open_with(opts, local, None)
    }

    /// [`Mgmt::open`] placing units on `hosts` while no agent is registered (a lab's hosts:
    /// `dva_lab::LabHosts`).
    pub fn open_in(opts: MgmtOptions, hosts: Box<dyn Topology>) -> anyhow::Result<Mgmt> {
        let local = Box::new(LocalProvisioner::new(opts.exe.clone()));
        Mgmt::open_with(opts, local, Some(hosts))
    }

    /// [`Mgmt::open_in`] with `local` running the units of this machine and of a lab (units on
    /// agents' hosts go through their agents whatever it is): tests put a provisioner there that
    /// starts nothing, or one that is slow.
    pub fn open_with(
        opts: MgmtOptions,
        local: Box<dyn Provisioner>,
        hosts: Option<Box<dyn Topology>>,
    ) -> anyhow::Result<Mgmt> {
        let (store, leadership, etcd): (Box<dyn Store>, _, _) = match &opts.store {
            StoreConfig::File(dir) => (Box::new(FileStore::open(dir)?), None, None),
            StoreConfig::Etcd(endpoints) => {
                let link = EtcdLink::connect(endpoints, opts.etcd_tls.as_ref())?;
                let leadership = Arc::new(Leadership::default());
                let store = EtcdStore::new(link.clone(), Some(leadership.clone()));
                (Box::new(store), Some(leadership), Some(link))
            }
        };
        // A replica that does not lead loads the records when it takes over, not now: setting
        // aside a corrupt one is a write, which only the leader may do.
        let (appliances, broken) = match &leadership {
            None => load(store.as_ref())?,
            Some(_) => Default::default(),
        };
        let pki_dir = opts.state_dir.join("pki");
        let mut pki = Pki::open(&pki_dir)?;
        if let Some(link) = &etcd {
            // Replicas share one CA: the units trust whichever replica leads.
            let shared = link.share_ca(&pki.bundle())?;
            if shared != pki.bundle() {
                pki = Pki::from_bundle(&pki_dir, &shared)?;
            }
        }
        let mine = pki.issue_mgmt()?;
        let link_tls =
            dva_unit::tls::Credentials::from_pem(&mine.cert_pem, &mine.key_pem, &mine.ca_pem)?
                .client_config()?;
        let registry = Arc::new(Registry::new(link_tls.clone(), opts.host_lost_after));
        if leadership.is_none() {
            registry.set(store.load_hosts()?);
        }
        let provisioner = Box::new(HostProvisioner::new(local, registry.clone()));
        let inner = Arc::new(Inner {
            opts,
            store,
            leadership,
            etcd,
            appliances: Mutex::new(appliances),
            broken: Mutex::new(broken),
            stop: AtomicBool::new(false),
            provisioner,
            registry,
            reconcile_passes: AtomicU64::new(0),
            last_pass_ms: AtomicU64::new(0),
            pki,
            link_tls,
            changes: Mutex::new(0),
            changed: Condvar::new(),
        });
        if inner.leadership.is_none() {
            reconcile::adopt_all(&inner);
        }
        {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name("host-poller".into())
                .spawn(move || crate::hosts::poll_loop(&inner))?;
        }
        let handle = {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name("reconciler".into())
                .spawn(move || reconcile::run(&inner, hosts))?
        };
        Ok(Mgmt {
            inner,
            reconciler: Arc::new(Mutex::new(Some(handle))),
        })
    }

    /// With the etcd store: start campaigning for leadership, advertising `api` (`HOST:PORT`,
    /// where the other replicas forward API calls). Call once the API listens there.
    pub fn campaign(&self, api: String) {
        if let (Some(link), Some(l)) = (&self.inner.etcd, &self.inner.leadership) {
            link.campaign(l.clone(), api);
        }
    }

    /// Who leads: always this replica, but with the etcd store.
    pub fn leader(&self) -> Leader {
        self.settled_leader(Duration::ZERO)
    }

    /// The leader, waiting up to `wait` for an election that is settling (see
    /// [`crate::etcd::Leadership::settled`]).
    pub fn settled_leader(&self, wait: Duration) -> Leader {
        match &self.inner.leadership {
            None => Leader::Me,
            Some(l) => l.settled(wait),
        }
    }

    /// The API token all replicas accept (etcd store: shared through etcd; else `local`).
    pub fn share_token(&self, local: &str) -> anyhow::Result<String> {
        match &self.inner.etcd {
            Some(link) => link.share_token(local),
            None => Ok(local.to_string()),
        }
    }

    pub fn options(&self) -> &MgmtOptions {
        &self.inner.opts
    }

    /// Create or replace an appliance from a spec (YAML or JSON text). The spec is parsed,
    /// validated and compiled before anything changes: a bad spec leaves the running one as it was.
    pub fn apply(&self, spec_text: &str) -> Result<ApplianceView, ApiError> {
        self.apply_with(spec_text, WriteOptions::default())
    }

    /// Create or replace an appliance's spec; with `opts.dry_run` everything is checked and the
    /// answer is what the appliance would look like, but nothing is stored or started.
    pub fn apply_with(
        &self,
        spec_text: &str,
        opts: WriteOptions,
    ) -> Result<ApplianceView, ApiError> {
        let _wake = Wake(&self.inner);
        let spec =
            ApplianceSpec::from_yaml(spec_text).map_err(|e| ApiError::Invalid(e.to_string()))?;
        reconcile::check_compiles(&spec).map_err(ApiError::Invalid)?;
        let name = spec.name().to_string();
        let layout = spec.spec.layout.dataplanes.clone();
        let mut all = self.inner.lock();
        check_generation(&name, all.get(&name).map(|a| a.rec.generation), opts)?;
        let view = match all.get_mut(&name) {
            Some(app) if app.deleting => {
                return Err(ApiError::Conflict(format!(
                    "appliance {name} is being deleted"
                )))
            }
            Some(app) => {
                if app.rec.spec_text == spec_text {
                    return Ok(reconcile::view(&self.inner, app));
                }
                // Units set the runtime up when they start and refuse a config that changes it:
                // taken, the new spec would leave every unit refusing every config after it
                // (no scaling, no failover) until restarted.
                let (was, asked) = (
                    RuntimeConfig::from_spec(&app.spec.spec.runtime),
                    RuntimeConfig::from_spec(&spec.spec.runtime),
                );
                if let Err(why) = was.unchanged(&asked) {
                    return Err(ApiError::Conflict(format!(
                        "appliance {name}: {why}; its units run as they started: delete the \
                         appliance and apply the spec again to change spec.runtime"
                    )));
                }
                let mut rec = app.rec.clone();
                rec.spec_text = spec_text.to_string();
                rec.generation += 1;
                rec.dataplanes = rec.dataplanes.clamp(layout.min, layout.max);
                if let Some(d) = spec.spec.layout.drain_deadline {
                    rec.drain_deadline_ms = d.ms();
                }
                if opts.dry_run {
                    return Ok(dry_run_view(&self.inner, rec, spec));
                }
                let msg = format!("spec replaced (generation {})", rec.generation);
                push_event(&mut rec, "applied", msg);
                self.save(&rec)?;
                app.rec = rec;
                app.spec = spec;
                reconcile::view(&self.inner, app)
            }
            None => {
                let mut rec = ApplianceRecord {
                    name: name.clone(),
                    spec_text: spec_text.to_string(),
                    generation: 1,
                    dataplanes: layout.initial(),
                    drain_deadline_ms: spec
                        .spec
                        .layout
                        .drain_deadline
                        .map_or(DEFAULT_DRAIN_DEADLINE_MS, |d| d.ms()),
                    units: Vec::new(),
                    next_unit_id: 1,
                    events: Vec::new(),
                    created_ms: now_ms(),
                    manager_port: None,
                };
                if opts.dry_run {
                    return Ok(dry_run_view(&self.inner, rec, spec));
                }
                let msg = format!("created with {} data plane(s)", rec.dataplanes);
                push_event(&mut rec, "applied", msg);
                self.save(&rec)?;
                let app = Appliance {
                    rec,
                    spec,
                    deleting: false,
                    rt: Runtime::default(),
                };
                let view = reconcile::view(&self.inner, &app);
                // A fresh spec replaces a record that was set aside (the file stays aside).
                self.inner.broken().remove(&name);
                all.insert(name, app);
                view
            }
        };
        Ok(view)
    }

    pub fn list(&self) -> Vec<ApplianceView> {
        let all = self.inner.lock();
        let mut views: Vec<ApplianceView> = all
            .values()
            .map(|a| reconcile::view(&self.inner, a))
            .collect();
        views.extend(self.inner.broken().iter().map(|(n, b)| b.view(n)));
        views.sort_by(|a, b| a.name.cmp(&b.name));
        views
    }

    pub fn get(&self, name: &str) -> Result<ApplianceView, ApiError> {
        let all = self.inner.lock();
        match all.get(name) {
            Some(app) => Ok(reconcile::view(&self.inner, app)),
            None => self
                .inner
                .broken()
                .get(name)
                .map(|b| b.view(name))
                .ok_or_else(|| not_found(name)),
        }
    }

    /// Stop every unit of the appliance and forget it. Returns once the units are gone.
    /// Ready to serve: the reconciler has finished a pass lately (it runs every few hundred
    /// milliseconds; a stuck one — a provisioner that hangs, a lock held too long — fails
    /// readiness, so a load balancer in front of several replicas skips this one).
    /// A replica that does not lead is ready while it knows the leader (it forwards to it).
    pub fn ready(&self) -> Result<(), String> {
        const STALE_MS: u64 = 5_000;
        match self.leader() {
            Leader::Me => {}
            Leader::Other(_) => return Ok(()),
            Leader::Unknown => return Err("no leader elected (yet): retry".into()),
        }
        let last = self.inner.last_pass_ms.load(Ordering::Relaxed);
        if last == 0 {
            return Err("the reconciler has not finished a pass yet".into());
        }
        let age = now_ms().saturating_sub(last);
        if age > STALE_MS {
            return Err(format!(
                "the reconciler's last pass ended {age} ms ago (stuck for more than {STALE_MS} ms)"
            ));
        }
        Ok(())
    }

    pub fn delete(&self, name: &str) -> Result<(), ApiError> {
        self.delete_with(name, WriteOptions::default())
    }

    pub fn delete_with(&self, name: &str, opts: WriteOptions) -> Result<(), ApiError> {
        let _wake = Wake(&self.inner);
        {
            let mut all = self.inner.lock();
            if all.contains_key(name) {
                check_generation(name, all.get(name).map(|a| a.rec.generation), opts)?;
                if opts.dry_run {
                    return Ok(());
                }
            }
            let Some(app) = all.get_mut(name) else {
                if opts.dry_run {
                    return match self.inner.broken().contains_key(name) {
                        true => Ok(()),
                        false => Err(not_found(name)),
                    };
                }
                // An appliance known only by its unusable record: forgetting it is all there is
                // to do (its file stays set aside).
                return match self.inner.broken().remove(name) {
                    Some(_) => Ok(()),
                    None => Err(not_found(name)),
                };
            };
            app.deleting = true;
        }
        reconcile::delete(&self.inner, name).map_err(|e| ApiError::Internal(format!("{e:#}")))
    }

    /// Set the number of data planes (within the layout's min..=max).
    pub fn scale(&self, name: &str, req: &ScaleRequest) -> Result<ApplianceView, ApiError> {
        self.scale_with(name, req, WriteOptions::default())
    }

    pub fn scale_with(
        &self,
        name: &str,
        req: &ScaleRequest,
        opts: WriteOptions,
    ) -> Result<ApplianceView, ApiError> {
        let _wake = Wake(&self.inner);
        let deadline = req
            .drain_deadline
            .as_deref()
            .map(parse_duration_ms)
            .transpose()
            .map_err(|e| ApiError::Invalid(format!("drain_deadline: {e}")))?;
        let mut all = self.inner.lock();
        let Some(app) = all.get_mut(name) else {
            if let Some(b) = self.inner.broken().get(name) {
                return Err(ApiError::Conflict(format!(
                    "appliance {name} cannot be scaled: {} (apply its spec again or delete it)",
                    b.error
                )));
            }
            return Err(not_found(name));
        };
        if app.deleting {
            return Err(ApiError::Conflict(format!(
                "appliance {name} is being deleted"
            )));
        }
        check_generation(name, Some(app.rec.generation), opts)?;
        let layout = &app.spec.spec.layout.dataplanes;
        if req.dataplanes < layout.min || req.dataplanes > layout.max {
            return Err(ApiError::Invalid(format!(
                "dataplanes: {} is outside the layout's bounds {}..={} (spec.layout.dataplanes)",
                req.dataplanes, layout.min, layout.max
            )));
        }
        let mut rec = app.rec.clone();
        let from = rec.dataplanes;
        rec.dataplanes = req.dataplanes;
        if let Some(d) = deadline {
            rec.drain_deadline_ms = d;
        }
        rec.generation += 1;
        if opts.dry_run {
            return Ok(dry_run_view(&self.inner, rec, app.spec.clone()));
        }
        let msg = format!(
            "data planes {from} -> {} (drain deadline {} ms)",
            rec.dataplanes, rec.drain_deadline_ms
        );
        push_event(&mut rec, "scaled", msg);
        self.save(&rec)?;
        app.rec = rec;
        // A change by hand restarts the autoscaler's cooldown.
        app.rt.autoscaler.last_change_ms = Some(now_ms());
        Ok(reconcile::view(&self.inner, app))
    }

    pub fn units(&self, name: &str) -> Result<Vec<UnitView>, ApiError> {
        Ok(self.get(name)?.units)
    }

    pub fn events(&self, name: &str) -> Result<Vec<Event>, ApiError> {
        let all = self.inner.lock();
        match all.get(name) {
            Some(app) => Ok(app.rec.events.clone()),
            None => self
                .inner
                .broken()
                .get(name)
                .map(|b| b.events.clone())
                .ok_or_else(|| not_found(name)),
        }
    }

    /// Stop the reconciler (units keep running: a restarted `dva serve` adopts them).
    /// The change count now (see [`Mgmt::wait_change`]).
    pub fn change_count(&self) -> u64 {
        *self.inner.changes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wait until the change count passes `seen` or `timeout` elapses; the count then.
    pub fn wait_change(&self, seen: u64, timeout: Duration) -> u64 {
        let guard = self.inner.changes.lock().unwrap_or_else(|e| e.into_inner());
        let (guard, _) = self
            .inner
            .changed
            .wait_timeout_while(guard, timeout, |n| *n == seen)
            .unwrap_or_else(|e| e.into_inner());
        *guard
    }

    pub fn shutdown(&self) {
        self.inner.stop.store(true, Ordering::Release);
        let handle = self.reconciler.lock().ok().and_then(|mut h| h.take());
        if let Some(h) = handle {
            let _ = h.join();
        }
        // The reconciler has stopped: hand over at once rather than after the lease's TTL.
        if let (Some(link), Some(l)) = (&self.inner.etcd, &self.inner.leadership) {
            link.resign(l);
        }
    }

    fn save(&self, rec: &ApplianceRecord) -> Result<(), ApiError> {
        self.inner
            .store
            .save(rec)
            .map_err(|e| ApiError::Internal(format!("store: {e:#}")))
    }
}

/// Every stored appliance, and the records that could not be used (set aside).
pub(crate) fn load(
    store: &dyn Store,
) -> anyhow::Result<(BTreeMap<String, Appliance>, BTreeMap<String, Broken>)> {
    let mut appliances = BTreeMap::new();
    let loaded = store.load_all()?;
    let mut broken: Vec<CorruptRecord> = loaded.corrupt;
    for rec in loaded.records {
        let spec = match ApplianceSpec::from_yaml(&rec.spec_text) {
            Ok(spec) => spec,
            // E.g. a spec accepted by an older version whose checks were looser.
            Err(e) => {
                let why = format!("its spec no longer passes validation: {e}");
                broken.push(store.set_aside(&rec.name, &why));
                continue;
            }
        };
        appliances.insert(
            rec.name.clone(),
            Appliance {
                rec,
                spec,
                deleting: false,
                rt: Runtime::default(),
            },
        );
    }
    let broken = broken
        .into_iter()
        .map(|c| {
            tracing::warn!(appliance = %c.name, "store record set aside: {}", c.reason);
            let event = Event {
                time_ms: now_ms(),
                reason: "store-corrupt".into(),
                message: c.reason.clone(),
            };
            let b = Broken {
                error: c.reason,
                events: vec![event],
            };
            (c.name, b)
        })
        .collect();
    Ok((appliances, broken))
}

/// Optimistic concurrency: a write that names the generation it last saw is refused when the
/// appliance has moved on (or is gone), so two operators cannot overwrite each other unseen.
/// Wakes the watches when a write returns, however it returns (declared first in a write, it
/// is dropped last: after the appliances' lock is released).
struct Wake<'a>(&'a Inner);

impl Drop for Wake<'_> {
    fn drop(&mut self) {
        self.0.notify();
    }
}

fn check_generation(name: &str, current: Option<u64>, opts: WriteOptions) -> Result<(), ApiError> {
    match (opts.if_match, current) {
        (Some(want), Some(have)) if want != have => Err(ApiError::PreconditionFailed(format!(
            "appliance {name} is at generation {have}, not {want} (If-Match): it changed since \
             you read it; read it again"
        ))),
        (Some(want), None) => Err(ApiError::PreconditionFailed(format!(
            "appliance {name} does not exist, so it is not at generation {want} (If-Match)"
        ))),
        _ => Ok(()),
    }
}

/// What a write would leave, as the API shows an appliance: the record it would store, with no
/// units started or stopped.
fn dry_run_view(inner: &Arc<Inner>, rec: ApplianceRecord, spec: ApplianceSpec) -> ApplianceView {
    let app = Appliance {
        rec,
        spec,
        deleting: false,
        rt: Runtime::default(),
    };
    reconcile::view(inner, &app)
}

fn not_found(name: &str) -> ApiError {
    ApiError::NotFound(format!("no appliance named {name:?}"))
}

/// Record a decision or observation in the appliance's event list, and log it: every event is
/// also a log line, so `dva serve`'s log tells what it decided and why.
pub(crate) fn push_event(rec: &mut ApplianceRecord, reason: &str, message: String) {
    let warn = matches!(
        reason,
        "rejected" | "unit-died" | "config-nack" | "store-corrupt" | "unit-failed"
    );
    if warn {
        tracing::warn!(appliance = %rec.name, reason, "{message}");
    } else {
        tracing::info!(appliance = %rec.name, reason, "{message}");
    }
    rec.events.push(Event {
        time_ms: now_ms(),
        reason: reason.to_string(),
        message,
    });
    if rec.events.len() > MAX_EVENTS {
        let excess = rec.events.len() - MAX_EVENTS;
        rec.events.drain(..excess);
    }
}
