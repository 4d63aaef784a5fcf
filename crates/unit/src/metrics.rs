//! Prometheus exposition of [`UnitStats`], through `prometheus-client`.
//!
//! One [`Exposition`] is one scrape: a fresh registry whose families are filled from stats
//! snapshots and then encoded once. The data path keeps its own plain counters and publishes
//! [`UnitStats`]; nothing here is touched per packet, so building a registry per scrape costs a
//! few allocations per scrape and keeps a single source of truth (the stats snapshot), which the
//! unit's control socket and `dva serve`'s aggregated `/metrics` both encode the same way.
//!
//! Every unit sample carries `appliance`, `unit` and `role`; many units added to one
//! [`Exposition`] share each family (one `# HELP`/`# TYPE`), their samples told apart by those
//! labels. The encoding is the Prometheus text format 0.0.4 (what promtool and Prometheus 2.x
//! read natively), with label values escaped by the crate.
//!
//! Latency histograms arrive pre-aggregated ([`crate::stats::Histogram`]) and are encoded as
//! real Prometheus histograms (`_bucket{le=...}`, `_sum`, `_count`) through [`Snapshot`].

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::{prometheus_text, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};

use crate::stats::{Histogram, UnitStats};

/// The `Content-Type` of what [`Exposition::encode`] writes.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// A label set: ordered (name, value) pairs.
pub type Labels = Vec<(&'static str, String)>;

type CounterF = Counter<f64, AtomicU64>;
type GaugeF = Gauge<f64, AtomicU64>;

/// Entries of [`UnitStats::counters`] that are current counts, not event counts: exported as
/// gauges of their own (metric name without `dva_`, help).
const GAUGE_COUNTERS: &[(&str, &str, &str)] = &[
    ("nat_bindings", "nat_bindings", "NAT bindings held"),
    ("lb_flows", "lb_flows", "Load-balanced flows held"),
    (
        "replica_flows",
        "replica_flows",
        "Backup copies of other data planes' flows held",
    ),
    (
        "leader",
        "manager_leader",
        "1 if this manager leads the appliance",
    ),
    (
        "lanes",
        "unit_lanes",
        "Data-path threads (lanes) of this unit: a dispatcher's dispatcher_threads, a data plane's dataplane_threads",
    ),
];

/// Prefix of the backplane authentication counters in [`UnitStats::counters`].
const AUTH_PREFIX: &str = "backplane_auth_";

/// Basics of a process, as the Prometheus client libraries export them (`process_*`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProcessStats {
    pub cpu_seconds: f64,
    pub resident_memory_bytes: u64,
    pub virtual_memory_bytes: u64,
    pub open_fds: u64,
    pub max_fds: u64,
    /// Since the Unix epoch.
    pub start_time_seconds: f64,
}

impl ProcessStats {
    /// This process, read from `/proc/self`; `None` where procfs is missing or unreadable.
    pub fn read_self() -> Option<ProcessStats> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let btime = std::fs::read_to_string("/proc/stat")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<u64>().ok())?;
        let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
        // SAFETY: sysconf and getrlimit only read process-wide settings; `lim` is a valid,
        // exclusively borrowed rlimit for getrlimit to fill.
        let (ticks, page, max_fds) = unsafe {
            let mut lim: libc::rlimit = std::mem::zeroed();
            let max = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
                lim.rlim_cur
            } else {
                0
            };
            (
                libc::sysconf(libc::_SC_CLK_TCK),
                libc::sysconf(libc::_SC_PAGESIZE),
                max,
            )
        };
        Self::parse(&stat, btime, ticks, page, open_fds, max_fds)
    }

    /// From the text of `/proc/<pid>/stat` (`proc(5)`), the boot time, clock ticks per second
    /// and page size.
    fn parse(
        stat: &str,
        btime: u64,
        ticks: i64,
        page: i64,
        open_fds: u64,
        max_fds: u64,
    ) -> Option<ProcessStats> {
        if ticks <= 0 || page <= 0 {
            return None;
        }
        // The command name may hold spaces and parentheses: fields start after the last ')'.
        let rest = &stat[stat.rfind(')')? + 1..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        // `rest` starts at field 3 (state): field n is f[n - 3].
        let num = |n: usize| f.get(n - 3)?.parse::<u64>().ok();
        let ticks = ticks as f64;
        Some(ProcessStats {
            cpu_seconds: (num(14)? + num(15)?) as f64 / ticks,
            start_time_seconds: btime as f64 + num(22)? as f64 / ticks,
            virtual_memory_bytes: num(23)?,
            resident_memory_bytes: num(24)?.saturating_mul(page as u64),
            open_fds,
            max_fds,
        })
    }
}

fn gauge(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A histogram of a stats snapshot as a prometheus-client metric. The crate's own `Histogram`
/// observes live values; this one is set once per scrape from what a unit already aggregated.
#[derive(Debug, Clone, Default)]
pub struct Snapshot(Arc<Mutex<Option<Histogram>>>);

impl Snapshot {
    fn set(&self, h: &Histogram) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(h.clone());
    }
}

impl TypedMetric for Snapshot {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Snapshot {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let guard = self.0.lock().unwrap_or_else(|e| e.into_inner());
        // `add_unit` sets only consistent histograms; the check is repeated here so nothing
        // else can make the `+Inf` bucket disagree with the count.
        let Some((h, buckets)) = guard.as_ref().and_then(|h| Some((h, h.buckets()?))) else {
            return Ok(());
        };
        encoder.encode_histogram::<NoLabelSet>(h.sum(), h.count(), &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// One scrape's registry. Add units (and anything else) to it, then [`encode`](Self::encode).
pub struct Exposition {
    registry: Registry,
    build_info: Family<Labels, Gauge>,
    config_version: Family<Labels, Gauge>,
    uptime: Family<Labels, GaugeF>,
    rx_packets: Family<Labels, Counter>,
    rx_bytes: Family<Labels, Counter>,
    tx_packets: Family<Labels, Counter>,
    tx_bytes: Family<Labels, Counter>,
    flows: Family<Labels, Gauge>,
    active_flows: Family<Labels, Gauge>,
    drops: Family<Labels, Counter>,
    events: Family<Labels, Counter>,
    current: Vec<Family<Labels, Gauge>>,
    auth: Family<Labels, Counter>,
    if_rx_packets: Family<Labels, Counter>,
    if_rx_bytes: Family<Labels, Counter>,
    if_tx_packets: Family<Labels, Counter>,
    if_tx_bytes: Family<Labels, Counter>,
    if_ring_drops: Family<Labels, Counter>,
    if_driver: Family<Labels, Gauge>,
    backend_new_flows: Family<Labels, Counter>,
    backend_flows: Family<Labels, Gauge>,
    backend_packets: Family<Labels, Counter>,
    backend_bytes: Family<Labels, Counter>,
    backend_up: Family<Labels, Gauge>,
    backend_healthy: Family<Labels, Gauge>,
    rule_hits: Family<Labels, Counter>,
    config_ack: Family<Labels, Snapshot>,
    table_switch: Family<Labels, Snapshot>,
    handover: Family<Labels, Snapshot>,
    cpu: Family<Labels, CounterF>,
    resident: Family<Labels, Gauge>,
    virt: Family<Labels, Gauge>,
    open_fds: Family<Labels, Gauge>,
    max_fds: Family<Labels, Gauge>,
    start_time: Family<Labels, GaugeF>,
}

impl Default for Exposition {
    fn default() -> Self {
        Self::new()
    }
}

impl Exposition {
    pub fn new() -> Exposition {
        let mut r = Registry::default();
        fn reg<M: prometheus_client::metrics::TypedMetric + Default + Clone>(
            r: &mut Registry,
            name: &str,
            help: &str,
        ) -> Family<Labels, M>
        where
            Family<Labels, M>: prometheus_client::registry::Metric,
        {
            let f = Family::<Labels, M>::default();
            r.register(name, help, f.clone());
            f
        }
        // Counters are registered without `_total`, and help texts without a final period: the
        // crate appends both. Families are written in the order registered.
        Exposition {
            build_info: reg(
                &mut r,
                "dva_build_info",
                "The dva version a process runs (always 1)",
            ),
            config_version: reg(&mut r, "dva_config_version", "Config version the unit runs"),
            uptime: reg(&mut r, "dva_uptime_seconds", "Time since the unit started"),
            rx_packets: reg(&mut r, "dva_rx_packets", "Packets received"),
            rx_bytes: reg(&mut r, "dva_rx_bytes", "Bytes received"),
            tx_packets: reg(&mut r, "dva_tx_packets", "Packets sent"),
            tx_bytes: reg(&mut r, "dva_tx_bytes", "Bytes sent"),
            flows: reg(
                &mut r,
                "dva_flows",
                "Connections a data plane tracks (backup copies excluded)",
            ),
            active_flows: reg(
                &mut r,
                "dva_active_flows",
                "Connections a data plane tracks that are still open",
            ),
            drops: reg(&mut r, "dva_drops", "Packets dropped, by reason"),
            events: reg(&mut r, "dva_events", "Role-specific events"),
            current: GAUGE_COUNTERS
                .iter()
                .map(|(_, name, help)| reg(&mut r, &format!("dva_{name}"), help))
                .collect(),
            auth: reg(
                &mut r,
                "dva_backplane_auth",
                "Backplane datagrams by authentication result (ok, or why refused)",
            ),
            if_rx_packets: reg(
                &mut r,
                "dva_interface_rx_packets",
                "Frames received on an appliance interface",
            ),
            if_rx_bytes: reg(
                &mut r,
                "dva_interface_rx_bytes",
                "Bytes received on an appliance interface",
            ),
            if_tx_packets: reg(
                &mut r,
                "dva_interface_tx_packets",
                "Frames sent on an appliance interface",
            ),
            if_tx_bytes: reg(
                &mut r,
                "dva_interface_tx_bytes",
                "Bytes sent on an appliance interface",
            ),
            if_ring_drops: reg(
                &mut r,
                "dva_interface_ring_drops",
                "Frames the kernel dropped on the way in (full ring, no free buffer)",
            ),
            if_driver: reg(
                &mut r,
                "dva_interface_driver",
                "The packet driver of an appliance interface (always 1)",
            ),
            backend_new_flows: reg(
                &mut r,
                "dva_lb_backend_new_flows",
                "New flows this data plane sent to a backend",
            ),
            backend_flows: reg(
                &mut r,
                "dva_lb_backend_flows",
                "Flows to a backend held by this data plane",
            ),
            backend_packets: reg(
                &mut r,
                "dva_lb_backend_packets",
                "Packets of a backend's flows, both directions",
            ),
            backend_bytes: reg(
                &mut r,
                "dva_lb_backend_bytes",
                "Bytes of a backend's flows, both directions",
            ),
            backend_up: reg(
                &mut r,
                "dva_lb_backend_up",
                "1 if the backend takes new flows (not down, not draining)",
            ),
            backend_healthy: reg(
                &mut r,
                "dva_lb_backend_healthy",
                "1 if a dispatcher's health checks find the backend up",
            ),
            rule_hits: reg(
                &mut r,
                "dva_firewall_rule_hits",
                "New connections a firewall rule decided (rule \"(default)\": none matched), since the rules last changed",
            ),
            config_ack: reg(
                &mut r,
                "dva_config_ack_seconds",
                "Manager: time from a config version's first send to a unit until that unit ACKed it, by the unit's role (target_role)",
            ),
            table_switch: reg(
                &mut r,
                "dva_table_switch_seconds",
                "Manager: time from the first send of a config whose bucket table moved buckets until every dispatcher ACKed it",
            ),
            handover: reg(
                &mut r,
                "dva_handover_seconds",
                "Data plane: time from a handed-over bucket's first state message arriving until the previous owner's Done (or the hold limit) released it",
            ),
            cpu: reg(
                &mut r,
                "process_cpu_seconds",
                "User and system CPU time spent in seconds",
            ),
            resident: reg(
                &mut r,
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
            ),
            virt: reg(
                &mut r,
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
            ),
            open_fds: reg(&mut r, "process_open_fds", "Number of open file descriptors"),
            max_fds: reg(
                &mut r,
                "process_max_fds",
                "Maximum number of open file descriptors",
            ),
            start_time: reg(
                &mut r,
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch in seconds",
            ),
            registry: r,
        }
    }

    /// Where callers register families of their own (`dva serve`'s metrics about itself).
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// `dva_build_info` and `process_*` of one process, under `base` labels.
    pub fn add_process(&self, base: &Labels, version: &str, p: Option<&ProcessStats>) {
        if !version.is_empty() {
            self.build_info
                .get_or_create(&with(base, [("version", version)]))
                .set(1);
        }
        let Some(p) = p else { return };
        self.cpu.get_or_create(base).inc_by(p.cpu_seconds);
        self.resident
            .get_or_create(base)
            .set(gauge(p.resident_memory_bytes));
        self.virt
            .get_or_create(base)
            .set(gauge(p.virtual_memory_bytes));
        self.open_fds.get_or_create(base).set(gauge(p.open_fds));
        self.max_fds.get_or_create(base).set(gauge(p.max_fds));
        self.start_time
            .get_or_create(base)
            .set(p.start_time_seconds);
    }

    /// Every sample of one unit's stats.
    pub fn add_unit(&self, s: &UnitStats) {
        let base: Labels = vec![
            ("appliance", s.appliance.clone()),
            ("unit", s.unit.to_string()),
            ("role", s.role.clone()),
        ];
        self.add_process(&base, &s.version, s.process.as_ref());
        self.config_version
            .get_or_create(&base)
            .set(gauge(s.config_version));
        self.uptime.get_or_create(&base).set(s.uptime_secs);
        self.rx_packets.get_or_create(&base).inc_by(s.rx_packets);
        self.rx_bytes.get_or_create(&base).inc_by(s.rx_bytes);
        self.tx_packets.get_or_create(&base).inc_by(s.tx_packets);
        self.tx_bytes.get_or_create(&base).inc_by(s.tx_bytes);
        // Only data planes track connections; elsewhere a 0 would read as "no traffic".
        if s.role == "dataplane" {
            self.flows.get_or_create(&base).set(gauge(s.flows));
            self.active_flows
                .get_or_create(&base)
                .set(gauge(s.active_flows));
        }
        for (reason, n) in &s.drops {
            self.drops
                .get_or_create(&with(&base, [("reason", reason)]))
                .inc_by(*n);
        }
        for (name, n) in &s.counters {
            if let Some(i) = GAUGE_COUNTERS.iter().position(|(k, _, _)| k == name) {
                self.current[i].get_or_create(&base).set(gauge(*n));
            } else if let Some(result) = name.strip_prefix(AUTH_PREFIX) {
                self.auth
                    .get_or_create(&with(&base, [("result", result)]))
                    .inc_by(*n);
            } else {
                self.events
                    .get_or_create(&with(&base, [("event", name)]))
                    .inc_by(*n);
            }
        }
        for i in &s.interfaces {
            let l = with(&base, [("interface", &i.name), ("device", &i.device)]);
            self.if_rx_packets.get_or_create(&l).inc_by(i.rx_frames);
            self.if_rx_bytes.get_or_create(&l).inc_by(i.rx_bytes);
            self.if_tx_packets.get_or_create(&l).inc_by(i.tx_frames);
            self.if_tx_bytes.get_or_create(&l).inc_by(i.tx_bytes);
            self.if_ring_drops.get_or_create(&l).inc_by(i.ring_drops);
            if !i.driver.is_empty() {
                self.if_driver
                    .get_or_create(&with(&l, [("driver", &i.driver)]))
                    .set(1);
            }
        }
        for b in &s.backends {
            let l = with(&base, [("service", &b.service), ("backend", &b.backend)]);
            self.backend_new_flows.get_or_create(&l).inc_by(b.new_flows);
            self.backend_flows
                .get_or_create(&l)
                .set(gauge(b.active_flows));
            self.backend_packets.get_or_create(&l).inc_by(b.packets);
            self.backend_bytes.get_or_create(&l).inc_by(b.bytes);
            self.backend_up
                .get_or_create(&l)
                .set(i64::from(b.state == dva_services::lb::BackendState::Up));
        }
        for h in &s.health {
            self.backend_healthy
                .get_or_create(&with(
                    &base,
                    [("service", &h.service), ("backend", &h.backend)],
                ))
                .set(i64::from(h.up));
        }
        for r in &s.rules {
            self.rule_hits
                .get_or_create(&with(&base, [("rule", &r.rule)]))
                .inc_by(r.hits);
        }
        let lat = &s.latency;
        // The base labels already hold `role` (the manager's): the acking unit's is `target_role`.
        for (role, h) in &lat.config_ack {
            histogram(
                &self.config_ack,
                &with(&base, [("target_role", role.as_str())]),
                h,
            );
        }
        if let Some(h) = &lat.table_switch {
            histogram(&self.table_switch, &base, h);
        }
        if let Some(h) = &lat.handover {
            histogram(&self.handover, &base, h);
        }
    }

    /// The Prometheus text exposition of everything added.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail; the encoder only passes on the writer's errors.
        let _ = prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

/// A consistent histogram under `labels`; one whose parts disagree (see
/// [`Histogram::buckets`]) is left out, so a family never holds an empty sample.
fn histogram(family: &Family<Labels, Snapshot>, labels: &Labels, h: &Histogram) {
    if h.buckets().is_some() {
        family.get_or_create(labels).set(h);
    }
}

fn with<const N: usize>(base: &Labels, more: [(&'static str, &str); N]) -> Labels {
    let mut l = base.clone();
    l.extend(more.iter().map(|(k, v)| (*k, v.to_string())));
    l
}

/// One unit's metrics, as its control socket serves them.
pub fn unit_exposition(s: &UnitStats) -> String {
    let e = Exposition::new();
    e.add_unit(s);
    e.encode()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{InterfaceStats, RuleHits};

    fn sample() -> UnitStats {
        UnitStats {
            appliance: "fw1".into(),
            unit: 2,
            role: "dispatcher".into(),
            version: "0.1.0".into(),
            rx_packets: 10,
            rx_bytes: 1000,
            drops: [("malformed".to_string(), 3)].into_iter().collect(),
            counters: [
                ("nat_bindings".to_string(), 5),
                ("backplane_auth_bad_tag".to_string(), 1),
                ("arp_replies".to_string(), 4),
            ]
            .into_iter()
            .collect(),
            interfaces: vec![InterfaceStats {
                name: "outside".into(),
                device: "a\"b\\c\nd".into(),
                rx_frames: 7,
                rx_bytes: 700,
                ..Default::default()
            }],
            rules: vec![RuleHits {
                rule: "allow-web".into(),
                hits: 9,
            }],
            process: Some(ProcessStats {
                cpu_seconds: 1.5,
                resident_memory_bytes: 4096,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn type_of<'a>(text: &'a str, family: &str) -> Option<&'a str> {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("# TYPE {family} ")))
    }

    #[test]
    fn counters_gauges_and_families_have_the_right_types() {
        let m = unit_exposition(&sample());
        assert_eq!(type_of(&m, "dva_rx_packets_total"), Some("counter"), "{m}");
        assert_eq!(type_of(&m, "dva_drops_total"), Some("counter"));
        assert_eq!(type_of(&m, "dva_nat_bindings"), Some("gauge"));
        assert_eq!(type_of(&m, "dva_config_version"), Some("gauge"));
        assert_eq!(type_of(&m, "process_cpu_seconds_total"), Some("counter"));
        assert_eq!(type_of(&m, "dva_firewall_rule_hits_total"), Some("counter"));
        let base = r#"appliance="fw1",unit="2",role="dispatcher""#;
        for want in [
            format!("dva_rx_packets_total{{{base}}} 10"),
            format!("dva_nat_bindings{{{base}}} 5"),
            format!("dva_drops_total{{{base},reason=\"malformed\"}} 3"),
            format!("dva_backplane_auth_total{{{base},result=\"bad_tag\"}} 1"),
            format!("dva_events_total{{{base},event=\"arp_replies\"}} 4"),
            format!("dva_firewall_rule_hits_total{{{base},rule=\"allow-web\"}} 9"),
            format!("dva_build_info{{{base},version=\"0.1.0\"}} 1"),
            format!("process_cpu_seconds_total{{{base}}} 1.5"),
            format!("process_resident_memory_bytes{{{base}}} 4096"),
        ] {
            assert!(m.lines().any(|l| l == want), "missing {want:?} in\n{m}");
        }
        for help in m.lines().filter(|l| l.starts_with("# HELP ")) {
            assert!(!help.ends_with(".."), "{help}");
        }
        // A current count never lands among events; a dispatcher reports no flow count.
        assert!(!m.contains("event=\"nat_bindings\""), "{m}");
        assert!(!m.lines().any(|l| l.starts_with("dva_flows{")), "{m}");
    }

    #[test]
    fn hostile_label_values_are_escaped() {
        let m = unit_exposition(&sample());
        let want = r#"dva_interface_rx_packets_total{appliance="fw1",unit="2",role="dispatcher",interface="outside",device="a\"b\\c\nd"} 7"#;
        assert!(m.lines().any(|l| l == want), "missing {want:?} in\n{m}");
        // Every line is a comment or one whole sample: no raw newline escaped the quotes.
        for l in m.lines() {
            assert!(
                l.starts_with('#') || l.ends_with(|c: char| c.is_ascii_digit()),
                "{l:?}"
            );
        }
    }

    #[test]
    fn many_units_share_one_family() {
        let e = Exposition::new();
        let mut a = sample();
        e.add_unit(&a);
        a.unit = 3;
        a.role = "dataplane".into();
        a.flows = 6;
        e.add_unit(&a);
        let m = e.encode();
        let types = m
            .lines()
            .filter(|l| l.starts_with("# TYPE dva_rx_packets_total "))
            .count();
        assert_eq!(types, 1, "{m}");
        assert!(m.contains(r#"dva_rx_packets_total{appliance="fw1",unit="3",role="dataplane"} 10"#));
        assert!(m.contains(r#"dva_flows{appliance="fw1",unit="3",role="dataplane"} 6"#));
        let mut seen = std::collections::HashSet::new();
        for l in m.lines().filter(|l| l.starts_with("# TYPE ")) {
            assert!(seen.insert(l), "family typed twice: {l}");
        }
    }

    #[test]
    fn latency_histograms_are_prometheus_histograms() {
        use crate::stats::{Latencies, CONFIG_ACK_BOUNDS, TABLE_SWITCH_BOUNDS};
        use std::time::Duration;
        let mut dp = Histogram::new(CONFIG_ACK_BOUNDS);
        dp.observe(Duration::from_micros(300));
        dp.observe(Duration::from_millis(3));
        dp.observe(Duration::from_secs(60));
        let mut disp = Histogram::new(CONFIG_ACK_BOUNDS);
        disp.observe(Duration::from_millis(2));
        // What a unit could send that does not hold together: left out, not encoded wrong.
        let broken: Histogram =
            serde_json::from_str(r#"{"bounds":[1.0],"counts":[1,1],"sum":1,"count":7}"#)
                .expect("parses");
        let s = UnitStats {
            appliance: "fw1".into(),
            unit: 1,
            role: "manager".into(),
            latency: Latencies {
                config_ack: [
                    ("dataplane".to_string(), dp),
                    ("dispatcher".to_string(), disp),
                    ("a\"b".to_string(), broken),
                ]
                .into_iter()
                .collect(),
                table_switch: Some(Histogram::new(TABLE_SWITCH_BOUNDS)),
                handover: None,
            },
            ..Default::default()
        };
        let m = unit_exposition(&s);
        assert_eq!(
            type_of(&m, "dva_config_ack_seconds"),
            Some("histogram"),
            "{m}"
        );
        assert_eq!(type_of(&m, "dva_table_switch_seconds"), Some("histogram"));
        // No data plane here: no handover family at all, not an empty one.
        assert_eq!(type_of(&m, "dva_handover_seconds"), None, "{m}");
        let base = r#"appliance="fw1",unit="1",role="manager""#;
        let dp = format!(r#"{base},target_role="dataplane""#);
        for want in [
            format!(r#"dva_config_ack_seconds_bucket{{{dp},le="0.0005"}} 1"#),
            format!(r#"dva_config_ack_seconds_bucket{{{dp},le="0.0025"}} 1"#),
            format!(r#"dva_config_ack_seconds_bucket{{{dp},le="0.005"}} 2"#),
            format!(r#"dva_config_ack_seconds_bucket{{{dp},le="30"}} 2"#),
            format!(r#"dva_config_ack_seconds_bucket{{{dp},le="+Inf"}} 3"#),
            format!(r#"dva_config_ack_seconds_sum{{{dp}}} 60.0033"#),
            format!(r#"dva_config_ack_seconds_count{{{dp}}} 3"#),
            format!(r#"dva_config_ack_seconds_count{{{base},target_role="dispatcher"}} 1"#),
            format!(r#"dva_table_switch_seconds_bucket{{{base},le="+Inf"}} 0"#),
            format!(r#"dva_table_switch_seconds_count{{{base}}} 0"#),
        ] {
            assert!(m.lines().any(|l| l == want), "missing {want:?} in\n{m}");
        }
        assert!(!m.contains(r#"target_role="a"#), "{m}");
        // Every bucket line of a series: one per bound, then +Inf, cumulative.
        let buckets: Vec<u64> = m
            .lines()
            .filter(|l| l.starts_with(&format!("dva_config_ack_seconds_bucket{{{dp},")))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse().ok())
            .collect();
        assert_eq!(buckets.len(), CONFIG_ACK_BOUNDS.len() + 1, "{m}");
        assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{buckets:?}");
    }

    #[test]
    fn parses_proc_stat() {
        // Fields 14/15 utime/stime, 22 starttime (ticks since boot), 23 vsize, 24 rss (pages).
        let stat = "42 (dva (x) y) S 1 42 42 0 -1 4194560 100 0 0 0 150 50 0 0 20 0 3 0 1000 8192000 300 18446744073709551615";
        let p = ProcessStats::parse(stat, 1_700_000_000, 100, 4096, 9, 1024).unwrap();
        assert_eq!(p.cpu_seconds, 2.0);
        assert_eq!(p.start_time_seconds, 1_700_000_010.0);
        assert_eq!(p.virtual_memory_bytes, 8_192_000);
        assert_eq!(p.resident_memory_bytes, 300 * 4096);
        assert_eq!((p.open_fds, p.max_fds), (9, 1024));
        assert!(ProcessStats::parse("garbage", 0, 100, 4096, 0, 0).is_none());
        assert!(ProcessStats::read_self().is_some_and(|p| p.open_fds > 0));
    }
}
