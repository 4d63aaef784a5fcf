//! Counters a unit publishes: one JSON shape for every role, rendered to Prometheus text too.

use std::collections::BTreeMap;
use std::fmt::Write as _;
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
}

impl UnitStats {
    pub fn total_drops(&self) -> u64 {
        self.drops.values().sum()
    }

    /// Prometheus text exposition format.
    pub fn to_prometheus(&self) -> String {
        let mut out = String::new();
        let base = format!(
            "appliance=\"{}\",unit=\"{}\",role=\"{}\"",
            self.appliance, self.unit, self.role
        );
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, u64)]| {
            let _ = writeln!(out, "# HELP dva_{name} {help}\n# TYPE dva_{name} {kind}");
            for (labels, v) in samples {
                let _ = writeln!(out, "dva_{name}{{{base}{labels}}} {v}");
            }
        };
        metric(
            "config_version",
            "gauge",
            "Config version the unit runs.",
            &[(String::new(), self.config_version)],
        );
        metric(
            "rx_packets_total",
            "counter",
            "Packets received.",
            &[(String::new(), self.rx_packets)],
        );
        metric(
            "rx_bytes_total",
            "counter",
            "Bytes received.",
            &[(String::new(), self.rx_bytes)],
        );
        metric(
            "tx_packets_total",
            "counter",
            "Packets sent.",
            &[(String::new(), self.tx_packets)],
        );
        metric(
            "tx_bytes_total",
            "counter",
            "Bytes sent.",
            &[(String::new(), self.tx_bytes)],
        );
        metric(
            "flows",
            "gauge",
            "Tracked connections.",
            &[(String::new(), self.flows)],
        );
        let drops: Vec<_> = self
            .drops
            .iter()
            .map(|(k, v)| (format!(",reason=\"{k}\""), *v))
            .collect();
        metric(
            "drops_total",
            "counter",
            "Packets dropped, by reason.",
            &drops,
        );
        let ev: Vec<_> = self
            .counters
            .iter()
            .map(|(k, v)| (format!(",event=\"{k}\""), *v))
            .collect();
        metric("events_total", "counter", "Role-specific events.", &ev);
        for (field, help, get) in [
            (
                "interface_rx_frames_total",
                "Frames received on an appliance interface.",
                (|i: &InterfaceStats| i.rx_frames) as fn(&InterfaceStats) -> u64,
            ),
            (
                "interface_tx_frames_total",
                "Frames sent on an appliance interface.",
                |i| i.tx_frames,
            ),
            (
                "interface_ring_drops_total",
                "Frames the kernel dropped on the way in (full ring, no free buffer).",
                |i| i.ring_drops,
            ),
        ] {
            if !self.interfaces.is_empty() {
                let s: Vec<_> = self
                    .interfaces
                    .iter()
                    .map(|i| (format!(",interface=\"{}\"", i.name), get(i)))
                    .collect();
                metric(field, "counter", help, &s);
            }
        }
        let drivers: Vec<_> = self
            .interfaces
            .iter()
            .filter(|i| !i.driver.is_empty())
            .map(|i| {
                (
                    format!(",interface=\"{}\",driver=\"{}\"", i.name, i.driver),
                    1,
                )
            })
            .collect();
        if !drivers.is_empty() {
            metric(
                "interface_driver",
                "gauge",
                "The packet driver of an appliance interface (always 1).",
                &drivers,
            );
        }
        if !self.backends.is_empty() {
            for (field, kind, help, get) in [
                (
                    "lb_backend_new_flows_total",
                    "counter",
                    "New flows this data plane sent to a backend.",
                    (|b: &dva_services::lb::BackendStats| b.new_flows)
                        as fn(&dva_services::lb::BackendStats) -> u64,
                ),
                (
                    "lb_backend_flows",
                    "gauge",
                    "Flows to a backend held by this data plane.",
                    |b| b.active_flows,
                ),
                (
                    "lb_backend_packets_total",
                    "counter",
                    "Packets of a backend's flows, both directions.",
                    |b| b.packets,
                ),
                (
                    "lb_backend_up",
                    "gauge",
                    "1 if the backend takes new flows (not down, not draining).",
                    |b| u64::from(b.state == dva_services::lb::BackendState::Up),
                ),
            ] {
                let s: Vec<_> = self
                    .backends
                    .iter()
                    .map(|b| {
                        (
                            format!(",service=\"{}\",backend=\"{}\"", b.service, b.backend),
                            get(b),
                        )
                    })
                    .collect();
                metric(field, kind, help, &s);
            }
        }
        out
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
