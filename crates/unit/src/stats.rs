//! Counters a unit publishes: one JSON shape for every role ([`crate::metrics`] renders it as
//! Prometheus text).

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
    pub fn due(&mut self, now: Instant) -> bool {
        if now >= self.next {
            self.next = now + self.period;
            true
        } else {
            false
        }
    }
}
