//! Counters a unit publishes: one JSON shape for every role ([`crate::metrics`] renders it as
//! Prometheus text).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct InterfaceStats {
    pub name: String,
    pub device: String,
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// Frames the kernel dropped on the way in: the receive ring was full (AF_PACKET, AF_XDP),
    /// or no fill-ring buffer was free or the frame did not fit one (AF_XDP).
    pub ring_drops: u64,
    /// The packet driver of this interface: "af_xdp (native)", "af_xdp (generic)" or
    /// "af_packet". Empty for units that predate the choice.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub driver: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UnitStats {
    pub appliance: String,
    pub unit: u32,
    pub role: String,
    pub config_version: u64,
    pub pid: u32,
    pub uptime_secs: f64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Tracked connections (data planes).
    pub flows: u64,
    /// Connections still open (TCP before its FIN exchange ends; connectionless ones seen lately).
    #[serde(default)]
    pub active_flows: u64,
    /// (bucket, connections) for every bucket holding any: reported to the manager, not shown.
    #[serde(default, skip_serializing)]
    pub bucket_flows: Vec<(u16, u32)>,
    /// Drops by reason; every packet a unit does not pass on is counted here.
    pub drops: BTreeMap<String, u64>,
    /// Role-specific event counters (e.g. `punted_out`, `arp_replies`).
    pub counters: BTreeMap<String, u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<InterfaceStats>,
    /// Dispatchers: load-balancer backends as the health checks see them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub health: Vec<dva_proto::channel::BackendHealth>,
    /// Data planes with a load balancer: per-backend counters.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<dva_services::lb::BackendStats>,
    /// Data planes: new connections each firewall rule decided, in rule order, then the default.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<RuleHits>,
    /// The dva version the unit runs (filled in by the control socket).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub version: String,
    /// The unit process's CPU, memory and descriptors (filled in by the control socket).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<crate::metrics::ProcessStats>,
    /// Latency distributions, each measured by the unit that sees both ends of the interval.
    /// Absent from units that predate them.
    #[serde(default, skip_serializing_if = "Latencies::is_empty")]
    pub latency: Latencies,
}

/// The latency histograms units publish. Named fields rather than a map: each has its own
/// metric name, help text and extra label in [`crate::metrics`], so a new one is a new field.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Latencies {
    /// Manager: a config version's first send to a unit until that unit's ACK of it, by the
    /// role of the unit ("dispatcher", "dataplane").
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub config_ack: BTreeMap<String, Histogram>,
    /// Manager: the first send of a config whose bucket table moved buckets until every
    /// dispatcher ACKed it (from then on packets go to the new owners).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub table_switch: Option<Histogram>,
    /// Data planes: a bucket's state handed over to this unit, from its first state message
    /// until the previous owner's `Done` (or the hold limit) ended the hold.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handover: Option<Histogram>,
}

impl Latencies {
    pub fn is_empty(&self) -> bool {
        self.config_ack.is_empty() && self.table_switch.is_none() && self.handover.is_none()
    }
}

/// Upper bounds (seconds) for a config push to a unit and its ACK: a TLS round trip and the
/// unit's apply take milliseconds; past [`crate::manager`]'s 5 s resend a send was lost.
pub const CONFIG_ACK_BOUNDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Upper bounds (seconds) for a bucket table switch: data planes ACK first, dispatchers only
/// after them or after a 3 s timeout, so it takes two pushes and can reach seconds.
pub const TABLE_SWITCH_BOUNDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Upper bounds (seconds) for one bucket's handover: a marker round trip on the backplane takes
/// well under a millisecond; a lost message costs the 250 ms hold limit or a 300 ms resend.
pub const HANDOVER_BOUNDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// A latency distribution, pre-aggregated where it is measured and published in stats
/// snapshots; [`crate::metrics`] encodes it as a Prometheus histogram.
///
/// `counts` are per bucket, *not* cumulative: `counts[i]` holds the observations `v` with
/// `bounds[i - 1] < v <= bounds[i]`, and the last entry (one past the bounds) those above the
/// last bound, so the counts add up to `count` (the `+Inf` bucket). Per-bucket counts are what
/// prometheus-client's encoder takes and accumulates.
///
/// The bounds of a live histogram are a `'static` table (never copied per observation); one
/// read back from JSON owns its bounds. `observe` never allocates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    bounds: Cow<'static, [f64]>,
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    /// An empty histogram over `bounds`: finite, strictly increasing upper bounds in seconds.
    pub fn new(bounds: &'static [f64]) -> Histogram {
        debug_assert!(
            bounds.windows(2).all(|w| w[0] < w[1]) && bounds.iter().all(|b| b.is_finite()),
            "histogram bounds must be finite and increasing"
        );
        Histogram {
            bounds: Cow::Borrowed(bounds),
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }

    pub fn observe(&mut self, d: Duration) {
        let v = d.as_secs_f64();
        let i = self.bounds.partition_point(|b| *b < v);
        // A histogram read from JSON may have fewer counts than bounds: `buckets` refuses it.
        if let Some(c) = self.counts.get_mut(i) {
            *c += 1;
        }
        self.sum += v;
        self.count += 1;
    }

    pub fn bounds(&self) -> &[f64] {
        &self.bounds
    }

    /// Add `other`'s observations (the same distribution measured by another thread). One over
    /// other bounds is left out: its counts would land in the wrong buckets.
    pub fn add(&mut self, other: &Histogram) {
        if other.bounds != self.bounds || other.counts.len() != self.counts.len() {
            return;
        }
        for (c, o) in self.counts.iter_mut().zip(&other.counts) {
            *c += o;
        }
        self.sum += other.sum;
        self.count += other.count;
    }

    /// Per-bucket counts, the last one above every bound (see the type's doc).
    pub fn counts(&self) -> &[u64] {
        &self.counts
    }

    /// Seconds observed in all.
    pub fn sum(&self) -> f64 {
        self.sum
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// `(upper bound, count in that bucket alone)`, ending with `(+Inf, count above the last
    /// bound)`: what prometheus-client's `encode_histogram` takes. `None` for a histogram whose
    /// parts disagree (it came from JSON: bounds not increasing, counts not one more than the
    /// bounds or not adding up to `count`), which is then better left out than encoded wrong.
    pub fn buckets(&self) -> Option<Vec<(f64, u64)>> {
        let consistent = self.counts.len() == self.bounds.len() + 1
            && self.bounds.iter().all(|b| b.is_finite())
            && self.bounds.windows(2).all(|w| w[0] < w[1])
            && self.sum.is_finite()
            && self
                .counts
                .iter()
                .try_fold(0u64, |a, c| a.checked_add(*c))
                .is_some_and(|total| total == self.count);
        consistent.then(|| {
            self.bounds
                .iter()
                .copied()
                .chain(std::iter::once(f64::INFINITY))
                .zip(self.counts.iter().copied())
                .collect()
        })
    }
}

/// Hits of one firewall rule: its name, or `#<index>` for an unnamed one, or `(default)`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleHits {
    pub rule: String,
    pub hits: u64,
}

impl UnitStats {
    pub fn total_drops(&self) -> u64 {
        self.drops.values().sum()
    }
}

/// Drop reasons as a fixed table, so the hot path increments an array slot, not a map entry.
pub struct DropCounters<const N: usize> {
    names: [&'static str; N],
    counts: [u64; N],
}

impl<const N: usize> DropCounters<N> {
    pub const fn new(names: [&'static str; N]) -> Self {
        DropCounters {
            names,
            counts: [0; N],
        }
    }
    #[inline]
    pub fn inc(&mut self, reason: usize) {
        if let Some(c) = self.counts.get_mut(reason) {
            *c += 1;
        }
    }
    /// Set a count kept elsewhere (e.g. by the backplane) under its drop reason.
    pub fn set(&mut self, reason: usize, count: u64) {
        if let Some(c) = self.counts.get_mut(reason) {
            *c = count;
        }
    }
    pub fn get(&self, reason: usize) -> u64 {
        self.counts.get(reason).copied().unwrap_or(0)
    }
    pub fn to_map(&self) -> BTreeMap<String, u64> {
        self.names
            .iter()
            .zip(self.counts.iter())
            .filter(|(_, c)| **c > 0)
            .map(|(n, c)| (n.to_string(), *c))
            .collect()
    }
}

/// Where a data path publishes its stats. The data path only ever `try_lock`s: it never waits on a reader.
#[derive(Clone)]
pub struct StatsCell {
    inner: Arc<Mutex<UnitStats>>,
    started: Instant,
}

impl StatsCell {
    pub fn new(initial: UnitStats) -> Self {
        StatsCell {
            inner: Arc::new(Mutex::new(initial)),
            started: Instant::now(),
        }
    }
    /// Publish if no reader holds the lock right now; a skipped publish is retried next period.
    pub fn try_publish(&self, mut s: UnitStats) -> bool {
        s.uptime_secs = self.started.elapsed().as_secs_f64();
        s.pid = std::process::id();
        match self.inner.try_lock() {
            Ok(mut g) => {
                *g = s;
                true
            }
            Err(_) => false,
        }
    }
    pub fn snapshot(&self) -> UnitStats {
        match self.inner.lock() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }
}

/// Paces periodic work (stats publishing, timers) in a busy loop without reading the clock per packet.
pub struct Every {
    period: Duration,
    next: Instant,
}

impl Every {
    pub fn new(period: Duration) -> Self {
        Every {
            period,
            next: Instant::now(),
        }
    }
    /// A period whose first turn is due at `now` (for a core given its clock).
    pub fn starting(period: Duration, now: Instant) -> Self {
        Every { period, next: now }
    }
    pub fn due(&mut self, now: Instant) -> bool {
        if now >= self.next {
            self.next = now + self.period;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: &[f64] = &[0.001, 0.01, 0.1];

    #[test]
    fn observations_land_in_their_bucket_and_inf_is_the_count() {
        let mut h = Histogram::new(BOUNDS);
        for ms in [0, 1, 2, 10, 50, 100, 5_000] {
            h.observe(Duration::from_millis(ms));
        }
        // A bound is inclusive (Prometheus' `le`): 1 ms falls in the 0.001 bucket.
        assert_eq!(h.counts(), &[2, 2, 2, 1]);
        assert_eq!(h.count(), 7);
        assert!((h.sum() - 5.163).abs() < 1e-9, "{}", h.sum());
        let b = h.buckets().expect("consistent");
        assert_eq!(b.len(), BOUNDS.len() + 1);
        assert_eq!(b.last(), Some(&(f64::INFINITY, 1)));
        assert_eq!(b.iter().map(|(_, n)| n).sum::<u64>(), h.count());
        let empty = Histogram::new(BOUNDS);
        assert_eq!(empty.buckets().map(|b| b.len()), Some(4));
        assert_eq!(empty.count(), 0);
    }

    #[test]
    fn the_bounds_in_use_are_increasing() {
        for bounds in [CONFIG_ACK_BOUNDS, TABLE_SWITCH_BOUNDS, HANDOVER_BOUNDS] {
            assert!(bounds.windows(2).all(|w| w[0] < w[1]), "{bounds:?}");
            assert!((12..=16).contains(&bounds.len()), "{bounds:?}");
        }
    }

    #[test]
    fn histograms_travel_in_stats_json() {
        let mut h = Histogram::new(CONFIG_ACK_BOUNDS);
        h.observe(Duration::from_micros(700));
        h.observe(Duration::from_secs(40));
        let s = UnitStats {
            role: "manager".into(),
            latency: Latencies {
                config_ack: [("dataplane".to_string(), h.clone())].into_iter().collect(),
                table_switch: Some(Histogram::new(TABLE_SWITCH_BOUNDS)),
                handover: None,
            },
            ..Default::default()
        };
        let json = serde_json::to_string(&s).expect("json");
        let back: UnitStats = serde_json::from_str(&json).expect("parse");
        assert_eq!(back.latency, s.latency);
        assert_eq!(back.latency.config_ack["dataplane"].buckets(), h.buckets());
        // Stats without histograms leave them out altogether.
        let plain = serde_json::to_string(&UnitStats::default()).expect("json");
        assert!(!plain.contains("latency"), "{plain}");
    }

    #[test]
    fn stats_of_a_unit_without_histograms_parse() {
        // What a unit published before histograms existed.
        let old = r#"{"appliance":"fw1","unit":3,"role":"dataplane","config_version":4,"pid":9,
            "uptime_secs":1.5,"rx_packets":1,"rx_bytes":2,"tx_packets":3,"tx_bytes":4,"flows":0,
            "drops":{},"counters":{}}"#;
        let s: UnitStats = serde_json::from_str(old).expect("old stats parse");
        assert!(s.latency.is_empty());
        assert_eq!(s.unit, 3);
    }

    #[test]
    fn an_inconsistent_histogram_from_json_is_refused_not_encoded() {
        let bad = [
            // Counts do not add up to the count.
            r#"{"bounds":[0.1,1.0],"counts":[1,0,0],"sum":0.05,"count":2}"#,
            // One count too few.
            r#"{"bounds":[0.1,1.0],"counts":[1,1],"sum":0.05,"count":2}"#,
            // Bounds not increasing.
            r#"{"bounds":[1.0,0.1],"counts":[1,0,0],"sum":0.05,"count":1}"#,
            // Overflowing counts.
            r#"{"bounds":[0.1],"counts":[18446744073709551615,1],"sum":1,"count":0}"#,
        ];
        for json in bad {
            let mut h: Histogram = serde_json::from_str(json).expect("parses");
            assert_eq!(h.buckets(), None, "{json}");
            // Observing into it does not panic either.
            h.observe(Duration::from_secs(5));
        }
    }
}
