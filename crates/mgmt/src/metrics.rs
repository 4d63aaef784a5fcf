//! `dva serve`'s aggregated `/metrics`: every running unit of every appliance, plus the
//! management tool's own metrics, as one Prometheus exposition; and the same reads of one
//! appliance's units as JSON (`/v1/appliances/{name}/stats`, what the web view turns into rates).
//!
//! Units are read as JSON stats (`/stats` on their control socket), not as their own
//! `/metrics` text, and everything is encoded here in one registry per scrape: re-parsing and
//! merging many expositions would need a text parser and could still repeat a family's
//! `# HELP`/`# TYPE` for every unit, whereas one registry holds each family once with the samples
//! of every unit (told apart by `appliance`/`unit`/`role`), and escaping is the crate's all
//! the way. Units are asked in parallel, each with [`UNIT_TIMEOUT`], so one stuck unit costs a
//! scrape at most that long; a unit that does not answer has `dva_unit_scrape_up` 0.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use dva_unit::metrics::{Exposition, Labels, ProcessStats};
use dva_unit::UnitStats;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;

use crate::core::Mgmt;
use crate::model::{now_ms, ApiError, StatsView, UnitCounters, UnitRecord, UnitState};

/// How long one unit has to answer a scrape.
pub const UNIT_TIMEOUT: Duration = Duration::from_millis(500);
/// Units asked at once (one short-lived thread each): a scrape of n units takes at most
/// `ceil(n / SCRAPE_PARALLEL) * UNIT_TIMEOUT`.
const SCRAPE_PARALLEL: usize = 32;

/// Upper bounds (seconds) of API answer times: a health check or a read takes well under a
/// millisecond, a scrape up to [`UNIT_TIMEOUT`] per round of units, a delete waits for units to
/// stop (seconds), and a call forwarded to the leader may take up to two minutes.
const API_BOUNDS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    120.0,
];

/// Labels of an API answer time: `method` and `route`, both `'static` strings taken from
/// [`crate::api::ROUTES`] (never the raw request), so the label set is closed.
pub type ApiRoute = [(&'static str, &'static str); 2];

/// `dva_mgmt_api_request_seconds`, which the API server observes and `/metrics` encodes.
pub type ApiLatency = Family<ApiRoute, Histogram, fn() -> Histogram>;

/// An empty [`ApiLatency`].
pub fn api_latency() -> ApiLatency {
    fn new() -> Histogram {
        Histogram::new(API_BOUNDS)
    }
    Family::new_with_constructor(new)
}

/// A unit to read: (appliance, id, role) and its control socket.
struct Target {
    labels: Labels,
    unit: crate::provision::UnitLaunch,
}

impl Mgmt {
    /// The exposition `GET /metrics` serves; `api_requests` counts API answers by status code,
    /// `api_latency` times them by route.
    pub fn metrics(&self, api_requests: &BTreeMap<u16, u64>, api_latency: &ApiLatency) -> String {
        let mut units_by_state: BTreeMap<(String, &'static str, &'static str), i64> =
            BTreeMap::new();
        let mut targets = Vec::new();
        let appliances;
        {
            let all = self.inner.lock();
            appliances = all.len();
            for (name, app) in all.iter() {
                for u in &app.rec.units {
                    *units_by_state
                        .entry((name.clone(), u.role.as_str(), state_name(u.state)))
                        .or_default() += 1;
                    // The units `units.json` lists: those serving traffic.
                    if matches!(u.state, UnitState::Ready | UnitState::Draining) {
                        targets.push(Target {
                            labels: vec![
                                ("appliance", name.clone()),
                                ("unit", u.id.to_string()),
                                ("role", u.role.as_str().to_string()),
                            ],
                            unit: crate::reconcile::launch(&self.inner, name, u),
                        });
                    }
                }
            }
        }
        let stats = read_units(&self.inner, targets.iter().map(|t| &t.unit));

        let mut e = Exposition::new();
        let r = e.registry_mut();
        let scrape_up = Family::<Labels, Gauge>::default();
        r.register(
            "dva_unit_scrape_up",
            "1 if the unit answered this scrape in time, else 0",
            scrape_up.clone(),
        );
        let appliances_g = Gauge::<i64>::default();
        r.register(
            "dva_mgmt_appliances",
            "Appliances the management tool holds",
            appliances_g.clone(),
        );
        let units = Family::<Labels, Gauge>::default();
        r.register(
            "dva_mgmt_units",
            "Units by appliance, role and state",
            units.clone(),
        );
        let passes = Counter::<u64>::default();
        r.register(
            "dva_mgmt_reconcile_passes",
            "Passes of the reconciler over every appliance",
            passes.clone(),
        );
        let requests = Family::<Labels, Counter>::default();
        r.register(
            "dva_mgmt_api_requests",
            "API requests answered, by HTTP status code",
            requests.clone(),
        );
        // The API server's own family, observed as requests are answered: registered as is
        // (a clone shares its samples), never copied.
        r.register(
            "dva_mgmt_api_request_seconds",
            "API requests: time from the request head having arrived to the answer written, by method and route template (streams excluded)",
            api_latency.clone(),
        );

        appliances_g.set(i64::try_from(appliances).unwrap_or(i64::MAX));
        for ((app, role, state), n) in units_by_state {
            units
                .get_or_create(&vec![
                    ("appliance", app),
                    ("role", role.to_string()),
                    ("state", state.to_string()),
                ])
                .set(n);
        }
        passes.inc_by(self.inner.reconcile_passes.load(Ordering::Relaxed));
        for (code, n) in api_requests {
            requests
                .get_or_create(&vec![("code", code.to_string())])
                .inc_by(*n);
        }
        e.add_process(
            &vec![("role", "mgmt".to_string())],
            env!("CARGO_PKG_VERSION"),
            ProcessStats::read_self().as_ref(),
        );
        for (t, s) in targets.iter().zip(&stats) {
            scrape_up
                .get_or_create(&t.labels)
                .set(i64::from(s.is_some()));
            if let Some(s) = s {
                e.add_unit(s);
            }
        }
        e.encode()
    }
}

impl Mgmt {
    /// `GET /v1/appliances/{name}/stats`: every unit's counters, read as `/metrics` reads them
    /// (the same timeout and parallelism), so a live view can turn two reads into rates.
    pub fn stats(&self, name: &str) -> Result<StatsView, ApiError> {
        let units: Vec<(UnitRecord, Option<crate::provision::UnitLaunch>)> = {
            let all = self.inner.lock();
            let app = all
                .get(name)
                .ok_or_else(|| ApiError::NotFound(format!("no appliance named {name:?}")))?;
            app.rec
                .units
                .iter()
                .map(|u| {
                    // Only units serving traffic have a control socket worth waiting for.
                    let serving = matches!(u.state, UnitState::Ready | UnitState::Draining);
                    let control = serving.then(|| crate::reconcile::launch(&self.inner, name, u));
                    (u.clone(), control)
                })
                .collect()
        };
        // Read outside the lock: a slow unit must not hold up the reconciler.
        let asked = units.iter().filter_map(|(_, c)| c.as_ref());
        let mut answers = read_units(&self.inner, asked).into_iter();
        let time_ms = now_ms();
        let units = units
            .iter()
            .map(|(u, control)| {
                let s = control.as_ref().and_then(|_| answers.next().flatten());
                let s = s.as_ref();
                UnitCounters {
                    id: u.id,
                    role: u.role,
                    host: u.host.clone(),
                    state: u.state,
                    answered: s.is_some(),
                    uptime_secs: s.map_or(0.0, |s| s.uptime_secs),
                    rx_packets: s.map_or(0, |s| s.rx_packets),
                    rx_bytes: s.map_or(0, |s| s.rx_bytes),
                    tx_packets: s.map_or(0, |s| s.tx_packets),
                    tx_bytes: s.map_or(0, |s| s.tx_bytes),
                    drops: s.map_or(0, UnitStats::total_drops),
                    flows: s.map_or(0, |s| s.flows),
                    active_flows: s.map_or(0, |s| s.active_flows),
                }
            })
            .collect();
        Ok(StatsView {
            name: name.to_string(),
            time_ms,
            units,
        })
    }
}

/// Read the stats of every unit at `controls`, [`SCRAPE_PARALLEL`] at a time, each within
/// [`UNIT_TIMEOUT`]; `None` for a unit that did not answer. In the order given.
fn read_units<'a>(
    inner: &crate::core::Inner,
    controls: impl Iterator<Item = &'a crate::provision::UnitLaunch>,
) -> Vec<Option<UnitStats>> {
    let controls: Vec<&crate::provision::UnitLaunch> = controls.collect();
    controls
        .chunks(SCRAPE_PARALLEL)
        .flat_map(|chunk| {
            std::thread::scope(|s| {
                let handles: Vec<_> = chunk.iter().map(|c| s.spawn(|| fetch(inner, c))).collect();
                // A unit whose thread could not finish counts as not answering.
                handles
                    .into_iter()
                    .map(|h| h.join().ok().flatten())
                    .collect::<Vec<_>>()
            })
        })
        .collect()
}

/// A unit's `/stats`, through the provisioner: the socket here, or the unit's agent.
fn fetch(inner: &crate::core::Inner, unit: &crate::provision::UnitLaunch) -> Option<UnitStats> {
    let (status, body) = inner
        .provisioner
        .control_get(unit, "/stats", UNIT_TIMEOUT)
        .ok()?;
    if status != 200 {
        return None;
    }
    serde_json::from_str(&body).ok()
}

fn state_name(s: UnitState) -> &'static str {
    match s {
        UnitState::Starting => "starting",
        UnitState::Ready => "ready",
        UnitState::Draining => "draining",
        UnitState::Stopped => "stopped",
        UnitState::Failed => "failed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::MgmtOptions;

    /// With no appliance, `/metrics` is the tool's own families, each typed once.
    #[test]
    fn own_metrics_without_appliances() {
        let state = std::env::temp_dir().join(format!("dva-mgmt-metrics-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&state);
        let mut opts = MgmtOptions::local(state.clone()).expect("options");
        opts.run_root = state.join("run");
        let mgmt = Mgmt::open(opts).expect("open");
        let latency = api_latency();
        latency
            .get_or_create(&[("method", "GET"), ("route", "/v1/appliances/{name}")])
            .observe(0.003);
        let text = mgmt.metrics(&[(200, 3), (401, 1)].into_iter().collect(), &latency);
        let missing = mgmt.stats("nope").map(|_| ()).map_err(|e| e.status());
        mgmt.shutdown();
        assert_eq!(missing, Err(404));
        let _ = std::fs::remove_dir_all(&state);
        for want in [
            "# TYPE dva_mgmt_appliances gauge",
            "dva_mgmt_appliances 0",
            "# TYPE dva_mgmt_reconcile_passes_total counter",
            "# TYPE dva_mgmt_api_requests_total counter",
            "dva_mgmt_api_requests_total{code=\"401\"} 1",
            "dva_mgmt_api_requests_total{code=\"200\"} 3",
            "# TYPE process_cpu_seconds_total counter",
            "# TYPE dva_mgmt_api_request_seconds histogram",
            r#"dva_mgmt_api_request_seconds_bucket{method="GET",route="/v1/appliances/{name}",le="0.0025"} 0"#,
            r#"dva_mgmt_api_request_seconds_bucket{method="GET",route="/v1/appliances/{name}",le="0.005"} 1"#,
            r#"dva_mgmt_api_request_seconds_bucket{method="GET",route="/v1/appliances/{name}",le="+Inf"} 1"#,
            r#"dva_mgmt_api_request_seconds_count{method="GET",route="/v1/appliances/{name}"} 1"#,
        ] {
            assert!(
                text.lines().any(|l| l == want),
                "missing {want:?} in\n{text}"
            );
        }
        assert!(
            text.lines()
                .any(|l| l.starts_with("dva_build_info{role=\"mgmt\",version=")),
            "{text}"
        );
        let mut seen = std::collections::HashSet::new();
        for l in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            assert!(seen.insert(l), "typed twice: {l}");
        }
    }
}
