//! The user-facing appliance spec.
//!
//! ```yaml
//! apiVersion: dva/v1
//! kind: Appliance
//! metadata: { name: edge-fw }
//! spec:
//!   interfaces:
//!     - { name: outside, device: out0, addresses: [198.18.1.1/24] }
//!     - { name: inside,  device: in0,  addresses: [198.18.2.1/24] }
//!   layout: { dataplanes: { min: 1, initial: 2, max: 8 } }
//!   services:
//!     - firewall:
//!         default: drop
//!         rules:
//!           - { from: outside, dst: 198.18.2.0/24, proto: tcp, dport: [80, 5201], action: accept }
//! ```
//!
//! Parsing goes YAML → untyped tree → typed spec through `serde_path_to_error`, so a type error names
//! the path of the field (`spec.services[0].firewall.rules[1].dport`) as well as the value.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use dva_wire::ip_proto;
use ipnet::IpNet;
use schemars::JsonSchema;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};

pub const API_VERSION: &str = "dva/v1";
pub const KIND: &str = "Appliance";
/// Longest appliance name: it becomes part of run-directory and (in the lab) namespace names.
pub const MAX_NAME_LEN: usize = 40;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("spec is not valid YAML/JSON: {0}")]
    Syntax(String),
    #[error("{path}: {message}")]
    Field { path: String, message: String },
}

impl SpecError {
    fn field(path: impl Into<String>, message: impl Into<String>) -> Self {
        SpecError::Field {
            path: path.into(),
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ApplianceSpec {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub spec: ApplianceBody,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApplianceBody {
    /// GENEVE virtual network id of this appliance's backplane traffic; derived from the name if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vni: Option<u32>,
    pub interfaces: Vec<InterfaceSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteSpec>,
    #[serde(default)]
    pub layout: LayoutSpec,
    /// How the units run their data paths (interface driver, backplane, busy polling, CPUs).
    #[serde(default, skip_serializing_if = "RuntimeSpec::is_default")]
    pub runtime: RuntimeSpec,
    pub services: Vec<ServiceSpec>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InterfaceSpec {
    /// The name rules refer to (`from: outside`).
    pub name: String,
    /// The host network device the dispatcher drives (in the lab: `out0`, `in0`).
    pub device: String,
    /// The appliance's own addresses on this segment, with prefix length (the connected subnet).
    pub addresses: Vec<Cidr>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    pub to: Cidr,
    pub via: IpAddr,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LayoutSpec {
    #[serde(default)]
    pub dataplanes: DataplaneLayout,
    /// Flow buckets (a power of two). More buckets spread flows more evenly and move less per change.
    #[serde(default = "default_buckets")]
    pub buckets: usize,
    /// Manager units: one leads, the others stand by to take over (1-5).
    #[serde(default = "one")]
    pub managers: u32,
    /// Dispatcher units, one per dispatcher host (1-8); upstream routers spread flows over them.
    #[serde(default = "one")]
    pub dispatchers: u32,
    /// How long a removed data plane serves its existing flows before it exports their state to
    /// the buckets' new owners and exits (e.g. "30s"; default 300s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_deadline: Option<DurationSpec>,
    /// Scale data planes by load, within min..=max.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscale: Option<AutoscaleSpec>,
    /// Labels a host must carry (every one, `dva agent --label k=v`) for this appliance's units
    /// to go there, as Kubernetes' `nodeSelector` (e.g. `{ zone: a }`); dispatchers also need
    /// `dispatcher=true`. Lab hosts and a single machine carry no labels: with a selector,
    /// nothing is placed there.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub host_selector: BTreeMap<String, String>,
}

impl Default for LayoutSpec {
    fn default() -> Self {
        LayoutSpec {
            dataplanes: DataplaneLayout::default(),
            buckets: default_buckets(),
            managers: 1,
            dispatchers: 1,
            drain_deadline: None,
            autoscale: None,
            host_selector: BTreeMap::new(),
        }
    }
}

/// A duration written as "500ms", "2s", "5m", "1h" (or a bare number of seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "serde_json::Value", into = "String")]
pub struct DurationSpec(pub u64 /* milliseconds */);

impl DurationSpec {
    pub fn ms(self) -> u64 {
        self.0
    }
}

impl From<DurationSpec> for String {
    fn from(d: DurationSpec) -> String {
        if d.0.is_multiple_of(1000) {
            format!("{}s", d.0 / 1000)
        } else {
            format!("{}ms", d.0)
        }
    }
}

impl TryFrom<serde_json::Value> for DurationSpec {
    type Error = String;
    fn try_from(v: serde_json::Value) -> Result<Self, String> {
        match &v {
            serde_json::Value::String(s) => parse_duration_ms(s).map(DurationSpec),
            serde_json::Value::Number(n) => n
                .as_f64()
                .filter(|f| f.is_finite() && *f >= 0.0 && *f < 1e9)
                .map(|f| DurationSpec((f * 1000.0) as u64))
                .ok_or_else(|| format!("invalid duration {n}")),
            other => Err(format!("invalid duration {other} (expected e.g. \"2s\")")),
        }
    }
}

/// Parse "2s", "500ms", "5m", "1h" or a bare number of seconds into milliseconds.
pub fn parse_duration_ms(s: &str) -> Result<u64, String> {
    parse_duration(
        s,
        &[("ms", 1.0), ("s", 1e3), ("m", 60e3), ("h", 3_600e3)],
        1e3,
        "2s, 500ms, 5m",
    )
}

/// Parse "50us", "1ms", "1s" or a bare number of seconds into microseconds.
pub fn parse_duration_us(s: &str) -> Result<u64, String> {
    parse_duration(
        s,
        &[
            ("us", 1.0),
            ("ms", 1e3),
            ("s", 1e6),
            ("m", 60e6),
            ("h", 3_600e6),
        ],
        1e6,
        "50us, 2ms, 1s",
    )
}

/// `s` as a number with one of `units` (suffix, length in the result's unit; longer suffixes
/// first, as "ms" before "s"), or a bare number of `bare` units.
fn parse_duration(s: &str, units: &[(&str, f64)], bare: f64, example: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = units
        .iter()
        .find_map(|(suffix, mult)| t.strip_suffix(suffix).map(|n| (n, *mult)))
        .unwrap_or((t, bare));
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("invalid duration {s:?} (expected e.g. {example})"))?;
    if !v.is_finite() || v < 0.0 || v * mult > 1e12 {
        return Err(format!("duration {s:?} out of range"));
    }
    Ok((v * mult) as u64)
}

/// A duration to the microsecond, for what is shorter than a millisecond: "50us", "1ms", "1s"
/// (or a bare number of seconds, as [`DurationSpec`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "serde_json::Value", into = "String")]
pub struct DurationUsSpec(pub u64 /* microseconds */);

impl From<DurationUsSpec> for String {
    fn from(d: DurationUsSpec) -> String {
        match d.0 {
            us if us.is_multiple_of(1_000_000) => format!("{}s", us / 1_000_000),
            us if us.is_multiple_of(1000) => format!("{}ms", us / 1000),
            us => format!("{us}us"),
        }
    }
}

impl TryFrom<serde_json::Value> for DurationUsSpec {
    type Error = String;
    fn try_from(v: serde_json::Value) -> Result<Self, String> {
        match &v {
            serde_json::Value::String(s) => parse_duration_us(s).map(DurationUsSpec),
            serde_json::Value::Number(n) => n
                .as_f64()
                .filter(|f| f.is_finite() && *f >= 0.0 && *f < 1e6)
                .map(|f| DurationUsSpec((f * 1e6) as u64))
                .ok_or_else(|| format!("invalid duration {n}")),
            other => Err(format!("invalid duration {other} (expected e.g. \"50us\")")),
        }
    }
}

/// How the units run their data paths. Every field may be left out; the defaults suit most
/// machines. A unit takes these with its first config and keeps them: a change reaches the
/// units started after it, and the running ones refuse it (their status says so) until they
/// are restarted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RuntimeSpec {
    /// The dispatchers' interface driver: `af_xdp`, `af_packet` (reads and writes 64 KB
    /// super-packets where the devices' offloads are on), or `auto` (the default, per
    /// interface: AF_PACKET on a veth with segmentation offload on, AF_XDP where the XDP
    /// program attaches, AF_PACKET otherwise).
    #[serde(default, skip_serializing_if = "DriverSpec::is_auto")]
    pub driver: DriverSpec,
    /// AF_XDP busy polling: how long a dispatcher's socket polls the device before sleeping
    /// (e.g. "50us", at most 1s): lower latency for a core kept busy. Absent or 0: off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub busy_poll: Option<DurationUsSpec>,
    /// The backplane between units on one machine: `auto` (the default) and `shm` use
    /// shared-memory rings there and UDP between machines; `udp` uses UDP everywhere.
    #[serde(default, skip_serializing_if = "BackplaneSpec::is_auto")]
    pub backplane: BackplaneSpec,
    /// CPUs the units' data paths are pinned to, a taskset-style list ("0-3", "0,2,4-7"): unit N
    /// runs on the list's (N mod length)-th CPU. Absent: not pinned (the scheduler decides).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<CpuList>,
    /// Data-path threads per dispatcher (1 to 64; absent: 1). Each thread (a lane) owns a share
    /// of every interface's frames: AF_PACKET sockets in one PACKET_FANOUT group spread by a
    /// symmetric flow hash (both directions of a flow on one lane), or AF_XDP sockets of the
    /// device's receive queues (lane i takes queues i, i+n, ...; the device's RSS spreads). Each
    /// lane has its own backplane port (the dispatcher's port + i). More lanes than CPUs only
    /// adds context switches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dispatcher_threads: Option<u16>,
    /// Threads per data plane (1 to 64; absent: 1). Each thread (a lane) serves the flow
    /// buckets `b` with `b % n == i`, with its own backplane port (the data plane's port + i),
    /// flow tables and replay windows: dispatchers send a bucket's packets to its lane, and
    /// handover, replication and punts go lane to lane. One data plane then uses as many cores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataplane_threads: Option<u16>,
}

impl RuntimeSpec {
    pub fn is_default(&self) -> bool {
        *self == RuntimeSpec::default()
    }

    /// Busy polling in microseconds (0: off). Validation bounds it by [`MAX_BUSY_POLL_US`].
    pub fn busy_poll_us(&self) -> u32 {
        self.busy_poll
            .map_or(0, |d| u32::try_from(d.0).unwrap_or(u32::MAX))
    }
}

/// Most data-path threads a dispatcher may run.
pub const MAX_DISPATCHER_THREADS: u16 = 64;

/// Longest busy-polling interval: a socket that polls longer only keeps a core from others.
pub const MAX_BUSY_POLL_US: u64 = 1_000_000;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DriverSpec {
    #[default]
    Auto,
    AfXdp,
    AfPacket,
}

impl DriverSpec {
    pub fn is_auto(&self) -> bool {
        *self == DriverSpec::Auto
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DriverSpec::Auto => "auto",
            DriverSpec::AfXdp => "af_xdp",
            DriverSpec::AfPacket => "af_packet",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BackplaneSpec {
    #[default]
    Auto,
    Shm,
    Udp,
}

impl BackplaneSpec {
    pub fn is_auto(&self) -> bool {
        *self == BackplaneSpec::Auto
    }

    pub fn as_str(self) -> &'static str {
        match self {
            BackplaneSpec::Auto => "auto",
            BackplaneSpec::Shm => "shm",
            BackplaneSpec::Udp => "udp",
        }
    }

    /// Shared-memory rings between units on one machine.
    pub fn rings(self) -> bool {
        self != BackplaneSpec::Udp
    }
}

/// A taskset-style CPU list, "0,2-4" (or one CPU number), in its order: [0, 2, 3, 4].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuList(pub Vec<usize>);

/// CPU numbers stay below this: the size of the kernel's `cpu_set_t` in bits.
pub const MAX_CPUS: usize = 1024;

/// "0,2-4" -> [0, 2, 3, 4]. Numbers below [`MAX_CPUS`]; empty items, reversed ranges and
/// non-numbers are errors.
pub fn parse_cpus(list: &str) -> Result<Vec<usize>, String> {
    if list.trim().is_empty() {
        return Err("no CPU listed (e.g. \"0-3\"; leave the field out for no pinning)".into());
    }
    let mut cpus = Vec::new();
    for item in list.split(',').map(str::trim) {
        let num = |s: &str| {
            s.parse::<usize>()
                .ok()
                .filter(|n| *n < MAX_CPUS)
                .ok_or_else(|| format!("{s:?} is not a CPU number (0..{})", MAX_CPUS - 1))
        };
        match item.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if a > b {
                    return Err(format!("range {item:?} runs backwards"));
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(num(item)?),
        }
    }
    Ok(cpus)
}

impl fmt::Display for CpuList {
    /// Runs of consecutive CPUs as ranges, in the list's order: parses back to the same list.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut i = 0;
        while let Some(&first) = self.0.get(i) {
            if i > 0 {
                f.write_str(",")?;
            }
            let mut last = first;
            while self.0.get(i + 1) == Some(&(last + 1)) {
                last += 1;
                i += 1;
            }
            if first == last {
                write!(f, "{first}")?;
            } else {
                write!(f, "{first}-{last}")?;
            }
            i += 1;
        }
        Ok(())
    }
}

impl Serialize for CpuList {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for CpuList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = CpuList;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a CPU list such as \"0-3\" or \"0,2,4-7\", or one CPU number")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<CpuList, E> {
                parse_cpus(v).map(CpuList).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<CpuList, E> {
                self.visit_str(&v.to_string())
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<CpuList, E> {
                self.visit_str(&v.to_string())
            }
        }
        d.deserialize_any(V)
    }
}

/// What a scaling rule measures, per data plane (averaged over the serving ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    /// Packets received per second.
    Pps,
    /// CPU used, in percent of one core.
    Cpu,
    /// Open connections.
    Flows,
}

impl Metric {
    pub fn as_str(self) -> &'static str {
        match self {
            Metric::Pps => "pps",
            Metric::Cpu => "cpu",
            Metric::Flows => "flows",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ScaleOutRule {
    pub metric: Metric,
    /// Scale out when the per-data-plane value stays above this...
    pub above: f64,
    /// ...for this long (the stabilization window).
    #[serde(rename = "for")]
    pub window: DurationSpec,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ScaleInRule {
    pub metric: Metric,
    /// Scale in when the per-data-plane value stays below this...
    pub below: f64,
    /// ...for this long.
    #[serde(rename = "for")]
    pub window: DurationSpec,
}

/// Scale-out if any scale-out rule holds; scale-in if every scale-in rule holds; at most one
/// change per cooldown. A metric's scale-in threshold must sit below its scale-out threshold so a
/// decision never undoes itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AutoscaleSpec {
    #[serde(default)]
    pub scale_out: Vec<ScaleOutRule>,
    #[serde(default)]
    pub scale_in: Vec<ScaleInRule>,
    #[serde(default = "default_cooldown")]
    pub cooldown: DurationSpec,
}

fn default_cooldown() -> DurationSpec {
    DurationSpec(30_000)
}

fn default_buckets() -> usize {
    4096
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DataplaneLayout {
    #[serde(default = "one")]
    pub min: u32,
    /// Defaults to `min`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial: Option<u32>,
    #[serde(default = "default_max")]
    pub max: u32,
}

impl DataplaneLayout {
    pub fn initial(&self) -> u32 {
        self.initial.unwrap_or(self.min)
    }
}

impl Default for DataplaneLayout {
    fn default() -> Self {
        DataplaneLayout {
            min: 1,
            initial: None,
            max: default_max(),
        }
    }
}

fn one() -> u32 {
    1
}
fn default_max() -> u32 {
    8
}
/// Upper bound on data planes per appliance: unit ids and per-bucket history stay small.
pub const MAX_DATAPLANES: u32 = 64;

/// One stage of the service chain, applied in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "lowercase")]
pub enum ServiceSpec {
    Firewall(FirewallSpec),
    Nat(NatSpec),
    Lb(LbSpec),
    Ratelimit(RatelimitSpec),
}

/// Per-source new-connection rate limiting: a token bucket per source prefix, charged by the
/// packets that would create a flow (established traffic is never limited). Goes before the
/// stages that create flows (firewall, nat, lb).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RatelimitSpec {
    /// New flows a second each source prefix may open, sustained (per data plane).
    pub new_flows_per_second: u32,
    /// New flows a source prefix may open at once (default: `new_flows_per_second`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// Prefix length IPv4 sources are grouped by (default 32: each address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_v4: Option<u8>,
    /// Prefix length IPv6 sources are grouped by (default 64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_v6: Option<u8>,
    /// Source prefixes tracked at most per data plane (default 65536); idle ones make room first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_sources: Option<usize>,
}

impl RatelimitSpec {
    pub fn compile(&self) -> dva_services::ratelimit::RateLimitConfig {
        let d = dva_services::ratelimit::RateLimitConfig::default();
        dva_services::ratelimit::RateLimitConfig {
            new_flows_per_second: self.new_flows_per_second,
            burst: self.burst.unwrap_or(self.new_flows_per_second),
            prefix_v4: self.prefix_v4.unwrap_or(d.prefix_v4),
            prefix_v6: self.prefix_v6.unwrap_or(d.prefix_v6),
            max_sources: self.max_sources.unwrap_or(d.max_sources),
        }
    }

    fn validate(&self, path: &str) -> Result<(), SpecError> {
        let at_least_one = |field: &str, v: Option<u64>| match v {
            Some(0) => Err(SpecError::field(
                format!("{path}.{field}"),
                "must be at least 1",
            )),
            _ => Ok(()),
        };
        at_least_one(
            "new_flows_per_second",
            Some(u64::from(self.new_flows_per_second)),
        )?;
        at_least_one("burst", self.burst.map(u64::from))?;
        at_least_one("max_sources", self.max_sources.map(|n| n as u64))?;
        for (field, v, max) in [
            ("prefix_v4", self.prefix_v4, 32),
            ("prefix_v6", self.prefix_v6, 128),
        ] {
            if let Some(v) = v.filter(|&v| v > max) {
                return Err(SpecError::field(
                    format!("{path}.{field}"),
                    format!("{v} is not a prefix length (0-{max})"),
                ));
            }
        }
        Ok(())
    }
}

/// Address translation: masquerade, source NAT to a pool, port forwarding.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NatSpec {
    /// Source NAT to the address of the interface traffic leaves by.
    #[serde(default)]
    pub masquerade: Vec<MasqueradeSpec>,
    /// Source NAT to an address pool.
    #[serde(default)]
    pub snat: Vec<SnatSpec>,
    /// Destination NAT: a public address/port forwarded to an inside server.
    #[serde(default)]
    pub port_forward: Vec<PortForwardSpec>,
    /// Most translations per data plane.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bindings: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MasqueradeSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Egress interface name: traffic to its networks leaves with its address as source.
    pub to: String,
    /// Only these sources (default: any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src: Option<CidrList>,
    /// Source ports to allocate from (default 1024-65535).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<PortList>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SnatSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src: Option<CidrList>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst: Option<CidrList>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proto: Option<Proto>,
    /// The pool: addresses the appliance owns (on one of its interfaces' networks).
    pub to: Vec<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<PortList>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PortForwardSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Ingress interface name.
    pub from: String,
    /// Public address (default: the ingress interface's address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst: Option<IpAddr>,
    pub proto: Proto,
    pub dport: PortList,
    /// The inside server.
    pub to: IpAddr,
    /// Its port (default: the same port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_port: Option<u16>,
}

/// L4 load balancing: virtual services in front of backend pools, full NAT.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LbSpec {
    pub services: Vec<VirtualServiceSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_flows: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VirtualServiceSpec {
    pub name: String,
    pub vip: IpAddr,
    pub proto: Proto,
    pub port: u16,
    pub backends: Vec<BackendSpec>,
    /// Interface whose address is the full-NAT source towards the backends (default: the
    /// interface on the first backend's network).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthSpec>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BackendSpec {
    pub name: String,
    pub addr: IpAddr,
    pub port: u16,
    #[serde(default = "one")]
    pub weight: u32,
    /// `drain`: keep existing connections, send no new ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<BackendAdmin>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BackendAdmin {
    Active,
    Drain,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HealthSpec {
    /// `tcp` (connect) or `http` (GET `path`, 2xx/3xx is healthy).
    #[serde(rename = "type")]
    pub kind: HealthKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default = "default_hc_interval")]
    pub interval: DurationSpec,
    #[serde(default = "default_hc_timeout")]
    pub timeout: DurationSpec,
    /// Consecutive successes that bring a backend up / failures that take it down.
    #[serde(default = "two")]
    pub rise: u32,
    #[serde(default = "two")]
    pub fall: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum HealthKind {
    Tcp,
    Http,
}

fn default_hc_interval() -> DurationSpec {
    DurationSpec(1000)
}
fn default_hc_timeout() -> DurationSpec {
    DurationSpec(500)
}
fn two() -> u32 {
    2
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FirewallSpec {
    /// What happens to a packet no rule matched (replies of tracked connections never get here).
    #[serde(default = "default_policy")]
    pub default: ActionSpec,
    #[serde(default)]
    pub rules: Vec<RuleSpec>,
    /// Most connections a data plane tracks of its own (backup copies have a cap of their own);
    /// at the cap a new one evicts a half-open one (early drop), or is dropped and counted if
    /// none is found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    /// TCP window tracking: `strict` (the default) drops segments of a tracked connection that
    /// fall outside its window (blind RSTs, data far ahead) as `tcp-out-of-window`; `liberal`
    /// accepts them, as Linux with `nf_conntrack_tcp_be_liberal=1` (asymmetric routing, where one
    /// direction never crosses the appliance).
    #[serde(default, skip_serializing_if = "TcpWindowSpec::is_strict")]
    pub tcp_window: TcpWindowSpec,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TcpWindowSpec {
    #[default]
    Strict,
    Liberal,
}

impl TcpWindowSpec {
    pub fn is_strict(&self) -> bool {
        *self == TcpWindowSpec::Strict
    }
}

fn default_policy() -> ActionSpec {
    ActionSpec::Drop
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ActionSpec {
    Accept,
    Drop,
    Reject,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Ingress interface name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src: Option<CidrList>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst: Option<CidrList>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proto: Option<Proto>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sport: Option<PortList>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dport: Option<PortList>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icmp_type: Option<IcmpType>,
    pub action: ActionSpec,
}

/// An address with prefix length. A bare address means a host (/32 or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr(pub IpNet);

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        if let Ok(net) = t.parse::<IpNet>() {
            return Ok(Cidr(net));
        }
        if let Ok(addr) = t.parse::<IpAddr>() {
            return Ok(Cidr(IpNet::from(addr)));
        }
        Err(format!(
            "invalid CIDR {s:?} (expected e.g. 198.18.2.0/24 or 2001:db8::/64)"
        ))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
    }
}

/// One CIDR or a list of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct CidrList(pub Vec<Cidr>);

impl<'de> Deserialize<'de> for CidrList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = CidrList;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a CIDR string or a list of them")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<CidrList, E> {
                Ok(CidrList(vec![v.parse().map_err(E::custom)?]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<CidrList, A::Error> {
                let mut out = Vec::new();
                while let Some(c) = seq.next_element::<Cidr>()? {
                    out.push(c);
                }
                Ok(CidrList(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// An inclusive port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ports {
    pub first: u16,
    pub last: u16,
}

impl fmt::Display for Ports {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

fn port_value(v: i128) -> Result<u16, String> {
    u16::try_from(v).map_err(|_| format!("port {v} out of range 0-65535"))
}

impl FromStr for Ports {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parse = |p: &str| -> Result<u16, String> {
            let v: i128 = p
                .trim()
                .parse()
                .map_err(|_| format!("invalid port {s:?} (expected 80 or \"1000-2000\")"))?;
            port_value(v)
        };
        let (first, last) = match s.split_once('-') {
            Some((a, b)) => (parse(a)?, parse(b)?),
            None => {
                let p = parse(s)?;
                (p, p)
            }
        };
        if first > last {
            return Err(format!("port range {s:?} is empty (first > last)"));
        }
        Ok(Ports { first, last })
    }
}

/// A port, a `"first-last"` range, or a list of those.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortList(pub Vec<Ports>);

impl Serialize for PortList {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(|p| p.to_string()))
    }
}

impl<'de> Deserialize<'de> for PortList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct One;
        impl<'de> Visitor<'de> for One {
            type Value = Ports;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a port number or a \"first-last\" range")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Ports, E> {
                let p = port_value(v.into()).map_err(E::custom)?;
                Ok(Ports { first: p, last: p })
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Ports, E> {
                let p = port_value(v.into()).map_err(E::custom)?;
                Ok(Ports { first: p, last: p })
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Ports, E> {
                v.parse().map_err(E::custom)
            }
        }
        struct OneDe(Ports);
        impl<'de> Deserialize<'de> for OneDe {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                d.deserialize_any(One).map(OneDe)
            }
        }
        struct Many;
        impl<'de> Visitor<'de> for Many {
            type Value = PortList;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a port, a \"first-last\" range, or a list of them")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<PortList, E> {
                One.visit_i64(v).map(|p| PortList(vec![p]))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<PortList, E> {
                One.visit_u64(v).map(|p| PortList(vec![p]))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<PortList, E> {
                One.visit_str(v).map(|p| PortList(vec![p]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<PortList, A::Error> {
                let mut out = Vec::new();
                while let Some(OneDe(p)) = seq.next_element::<OneDe>()? {
                    out.push(p);
                }
                Ok(PortList(out))
            }
        }
        d.deserialize_any(Many)
    }
}

/// An IP protocol by name (`tcp`, `udp`, `icmp`, `icmpv6`) or number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Proto(pub u8);

impl Proto {
    pub fn has_ports(self) -> bool {
        matches!(self.0, ip_proto::TCP | ip_proto::UDP | ip_proto::SCTP)
    }
}

impl Serialize for Proto {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            ip_proto::TCP => s.serialize_str("tcp"),
            ip_proto::UDP => s.serialize_str("udp"),
            ip_proto::ICMP => s.serialize_str("icmp"),
            ip_proto::ICMPV6 => s.serialize_str("icmpv6"),
            n => s.serialize_u8(n),
        }
    }
}

impl<'de> Deserialize<'de> for Proto {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Proto;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("tcp, udp, icmp, icmpv6 or a protocol number 0-255")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Proto, E> {
                u8::try_from(v)
                    .map(Proto)
                    .map_err(|_| E::custom(format!("protocol {v} out of range 0-255")))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Proto, E> {
                u8::try_from(v)
                    .map(Proto)
                    .map_err(|_| E::custom(format!("protocol {v} out of range 0-255")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Proto, E> {
                Ok(Proto(match v.to_ascii_lowercase().as_str() {
                    "tcp" => ip_proto::TCP,
                    "udp" => ip_proto::UDP,
                    "icmp" => ip_proto::ICMP,
                    "icmpv6" | "ipv6-icmp" => ip_proto::ICMPV6,
                    _ => {
                        return Err(E::custom(format!(
                            "unknown protocol {v:?} (expected tcp, udp, icmp, icmpv6 or a number)"
                        )))
                    }
                }))
            }
        }
        d.deserialize_any(V)
    }
}

/// An ICMP message type by name or number. Names resolve per family at compile time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IcmpType {
    Named(String),
    Number(u8),
}

const ICMP_NAMES: &[(&str, u8, u8)] = &[
    // name, ICMPv4 type, ICMPv6 type
    ("echo-reply", 0, 129),
    ("destination-unreachable", 3, 1),
    ("echo-request", 8, 128),
    ("time-exceeded", 11, 3),
    ("parameter-problem", 12, 4),
    ("packet-too-big", 255, 2),
];

impl IcmpType {
    /// The numeric type for ICMPv4 (`v6 == false`) or ICMPv6.
    pub fn resolve(&self, v6: bool) -> Result<u8, String> {
        match self {
            IcmpType::Number(n) => Ok(*n),
            IcmpType::Named(name) => {
                let hit = ICMP_NAMES.iter().find(|(n, _, _)| *n == name.as_str());
                match hit {
                    Some((_, v4, v6t)) => {
                        let t = if v6 { *v6t } else { *v4 };
                        if t == 255 {
                            Err(format!("ICMP type {name:?} exists only in ICMPv6"))
                        } else {
                            Ok(t)
                        }
                    }
                    None => Err(format!(
                        "unknown ICMP type {name:?} (expected one of {} or a number)",
                        ICMP_NAMES
                            .iter()
                            .map(|n| n.0)
                            .collect::<Vec<_>>()
                            .join(", ")
                    )),
                }
            }
        }
    }
}

impl Serialize for IcmpType {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            IcmpType::Named(n) => s.serialize_str(n),
            IcmpType::Number(n) => s.serialize_u8(*n),
        }
    }
}

impl<'de> Deserialize<'de> for IcmpType {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = IcmpType;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an ICMP type name (echo-request, ...) or number 0-255")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<IcmpType, E> {
                u8::try_from(v)
                    .map(IcmpType::Number)
                    .map_err(|_| E::custom(format!("ICMP type {v} out of range 0-255")))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<IcmpType, E> {
                u8::try_from(v)
                    .map(IcmpType::Number)
                    .map_err(|_| E::custom(format!("ICMP type {v} out of range 0-255")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<IcmpType, E> {
                let t = IcmpType::Named(v.to_string());
                // Reject unknown names here so the error carries the field path.
                t.resolve(false)
                    .or_else(|_| t.resolve(true))
                    .map_err(E::custom)?;
                Ok(t)
            }
        }
        d.deserialize_any(V)
    }
}

impl ApplianceSpec {
    /// Parse YAML (JSON is YAML too) and validate. Errors name the field path and the bad value.
    pub fn from_yaml(text: &str) -> Result<ApplianceSpec, SpecError> {
        let tree: serde_json::Value =
            serde_saphyr::from_str(text).map_err(|e| SpecError::Syntax(e.to_string()))?;
        Self::from_value(tree)
    }

    /// Parse an already-decoded JSON tree (the HTTP API's body) and validate.
    pub fn from_value(tree: serde_json::Value) -> Result<ApplianceSpec, SpecError> {
        let spec: ApplianceSpec = serde_path_to_error::deserialize(tree).map_err(|e| {
            let path = e.path().to_string();
            SpecError::field(
                if path == "." {
                    "spec".to_string()
                } else {
                    path
                },
                e.inner().to_string(),
            )
        })?;
        spec.validate()?;
        Ok(spec)
    }

    pub fn name(&self) -> &str {
        &self.metadata.name
    }

    /// Checks serde cannot express: references, bounds, address families.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.api_version != API_VERSION {
            return Err(SpecError::field(
                "apiVersion",
                format!(
                    "unsupported {:?} (expected {API_VERSION:?})",
                    self.api_version
                ),
            ));
        }
        if self.kind != KIND {
            return Err(SpecError::field(
                "kind",
                format!("unsupported {:?} (expected {KIND:?})", self.kind),
            ));
        }
        let name = &self.metadata.name;
        let name_ok = !name.is_empty()
            && name.len() <= MAX_NAME_LEN
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !name.starts_with('-')
            && !name.ends_with('-');
        if !name_ok {
            return Err(SpecError::field(
                "metadata.name",
                format!(
                    "invalid name {name:?}: use 1-{MAX_NAME_LEN} lowercase letters, digits and '-'"
                ),
            ));
        }
        for (key, value) in &self.metadata.labels {
            check_label_key(&format!("metadata.labels.{key}"), key)?;
            check_label_value(&format!("metadata.labels.{key}"), value)?;
        }
        let body = &self.spec;
        if let Some(vni) = body.vni {
            if vni >= 1 << 24 {
                return Err(SpecError::field(
                    "spec.vni",
                    format!("VNI {vni} does not fit in 24 bits"),
                ));
            }
        }
        if body.interfaces.is_empty() {
            return Err(SpecError::field(
                "spec.interfaces",
                "at least one interface is needed",
            ));
        }
        if body.interfaces.len() > 250 {
            return Err(SpecError::field(
                "spec.interfaces",
                format!("{} interfaces; at most 250", body.interfaces.len()),
            ));
        }
        let mut names = BTreeSet::new();
        let mut devices = BTreeSet::new();
        for (i, ifc) in body.interfaces.iter().enumerate() {
            let path = format!("spec.interfaces[{i}]");
            check_label(&format!("{path}.name"), &ifc.name)?;
            if !names.insert(ifc.name.as_str()) {
                return Err(SpecError::field(
                    format!("{path}.name"),
                    format!("duplicate interface name {:?}", ifc.name),
                ));
            }
            check_device(&format!("{path}.device"), &ifc.device)?;
            if !devices.insert(ifc.device.as_str()) {
                return Err(SpecError::field(
                    format!("{path}.device"),
                    format!(
                        "duplicate device {:?} (one interface per device)",
                        ifc.device
                    ),
                ));
            }
            if ifc.addresses.is_empty() {
                return Err(SpecError::field(
                    format!("{path}.addresses"),
                    "at least one address is needed",
                ));
            }
            for (j, a) in ifc.addresses.iter().enumerate() {
                if a.0.prefix_len() == a.0.max_prefix_len() || a.0.addr() == a.0.network() {
                    return Err(SpecError::field(
                        format!("{path}.addresses[{j}]"),
                        format!(
                            "{} must be a host address inside its subnet, e.g. 198.18.1.1/24",
                            a.0
                        ),
                    ));
                }
            }
        }
        for (i, r) in body.routes.iter().enumerate() {
            let on_link = body
                .interfaces
                .iter()
                .flat_map(|f| f.addresses.iter())
                .any(|a| a.0.contains(&r.via));
            if !on_link {
                return Err(SpecError::field(
                    format!("spec.routes[{i}].via"),
                    format!("next hop {} is not inside any interface's subnet", r.via),
                ));
            }
            if r.to.0.addr().is_ipv4() != r.via.is_ipv4() {
                return Err(SpecError::field(
                    format!("spec.routes[{i}]"),
                    format!("{} via {} mixes address families", r.to, r.via),
                ));
            }
        }
        let l = &body.layout;
        let dp = &l.dataplanes;
        if dp.min < 1 || dp.min > dp.initial() || dp.initial() > dp.max || dp.max > MAX_DATAPLANES {
            return Err(SpecError::field(
                "spec.layout.dataplanes",
                format!(
                    "need 1 <= min <= initial <= max <= {MAX_DATAPLANES}, got min {} initial {} max {}",
                    dp.min,
                    dp.initial(),
                    dp.max
                ),
            ));
        }
        if !(1..=8).contains(&l.dispatchers) {
            return Err(SpecError::field(
                "spec.layout.dispatchers",
                format!("{} is outside 1..=8", l.dispatchers),
            ));
        }
        if !(1..=5).contains(&l.managers) {
            return Err(SpecError::field(
                "spec.layout.managers",
                format!("{} is outside 1..=5", l.managers),
            ));
        }
        for (key, value) in &l.host_selector {
            check_label_key(&format!("spec.layout.host_selector.{key}"), key)?;
            check_label_value(&format!("spec.layout.host_selector.{key}"), value)?;
        }
        if let Some(a) = &l.autoscale {
            for (i, r) in a.scale_out.iter().enumerate() {
                if !(r.above.is_finite() && r.above > 0.0) {
                    return Err(SpecError::field(
                        format!("spec.layout.autoscale.scale_out[{i}].above"),
                        format!("{} must be a positive number", r.above),
                    ));
                }
            }
            for (i, r) in a.scale_in.iter().enumerate() {
                if !(r.below.is_finite() && r.below >= 0.0) {
                    return Err(SpecError::field(
                        format!("spec.layout.autoscale.scale_in[{i}].below"),
                        format!("{} must be a non-negative number", r.below),
                    ));
                }
                if let Some(o) = a
                    .scale_out
                    .iter()
                    .find(|o| o.metric == r.metric && o.above <= r.below)
                {
                    return Err(SpecError::field(
                        format!("spec.layout.autoscale.scale_in[{i}].below"),
                        format!(
                            "{} {} is not below the scale-out threshold {} for the same metric (the rules would flap)",
                            r.metric.as_str(),
                            r.below,
                            o.above
                        ),
                    ));
                }
            }
        }
        if !l.buckets.is_power_of_two() || !(64..=65536).contains(&l.buckets) {
            return Err(SpecError::field(
                "spec.layout.buckets",
                format!("{} is not a power of two in 64..=65536", l.buckets),
            ));
        }
        if let Some(d) = body.runtime.busy_poll.filter(|d| d.0 > MAX_BUSY_POLL_US) {
            return Err(SpecError::field(
                "spec.runtime.busy_poll",
                format!(
                    "{} is above 1s (a busy-polling interval such as \"50us\"; 0 turns it off)",
                    String::from(d)
                ),
            ));
        }
        if let Some(n) = body
            .runtime
            .dispatcher_threads
            .filter(|n| !(1..=MAX_DISPATCHER_THREADS).contains(n))
        {
            return Err(SpecError::field(
                "spec.runtime.dispatcher_threads",
                format!(
                    "{n} is not in 1..={MAX_DISPATCHER_THREADS} (data-path threads per dispatcher)"
                ),
            ));
        }
        if let Some(n) = body
            .runtime
            .dataplane_threads
            .filter(|n| !(1..=MAX_DISPATCHER_THREADS).contains(n))
        {
            return Err(SpecError::field(
                "spec.runtime.dataplane_threads",
                format!("{n} is not in 1..={MAX_DISPATCHER_THREADS} (threads per data plane)"),
            ));
        }
        if body.services.is_empty() {
            return Err(SpecError::field(
                "spec.services",
                "at least one service is needed (e.g. a firewall)",
            ));
        }
        let mut firewalls = 0;
        for (s, svc) in body.services.iter().enumerate() {
            match svc {
                ServiceSpec::Firewall(fw) => {
                    firewalls += 1;
                    if firewalls > 1 {
                        return Err(SpecError::field(
                            format!("spec.services[{s}]"),
                            "only one firewall stage is supported",
                        ));
                    }
                    for (i, r) in fw.rules.iter().enumerate() {
                        self.validate_rule(&format!("spec.services[{s}].firewall.rules[{i}]"), r)?;
                    }
                    if fw.max_connections == Some(0) {
                        return Err(SpecError::field(
                            format!("spec.services[{s}].firewall.max_connections"),
                            "must be at least 1",
                        ));
                    }
                }
                ServiceSpec::Nat(nat) => {
                    self.validate_nat(&format!("spec.services[{s}].nat"), nat)?
                }
                ServiceSpec::Lb(lb) => self.validate_lb(&format!("spec.services[{s}].lb"), lb)?,
                ServiceSpec::Ratelimit(r) => {
                    let path = format!("spec.services[{s}].ratelimit");
                    r.validate(&path)?;
                    if s > 0 && !matches!(body.services[s - 1], ServiceSpec::Ratelimit(_)) {
                        return Err(SpecError::field(
                            path,
                            "must come before the firewall, nat and lb stages (it limits the \
                             flows they create)",
                        ));
                    }
                }
            }
        }
        let count = |f: fn(&ServiceSpec) -> bool| body.services.iter().filter(|s| f(s)).count();
        if count(|s| matches!(s, ServiceSpec::Nat(_))) > 1
            || count(|s| matches!(s, ServiceSpec::Lb(_))) > 1
            || count(|s| matches!(s, ServiceSpec::Ratelimit(_))) > 1
        {
            return Err(SpecError::field(
                "spec.services",
                "at most one nat, one lb and one ratelimit stage",
            ));
        }
        Ok(())
    }

    fn interface_named(&self, path: &str, name: &str) -> Result<&InterfaceSpec, SpecError> {
        self.spec
            .interfaces
            .iter()
            .find(|i| i.name == name)
            .ok_or_else(|| {
                SpecError::field(
                    path,
                    format!(
                        "unknown interface {name:?} (interfaces: {})",
                        self.spec
                            .interfaces
                            .iter()
                            .map(|i| i.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )
            })
    }

    /// The interface whose network contains `addr` (where the appliance must answer ARP for it).
    pub fn interface_for(&self, addr: IpAddr) -> Option<&InterfaceSpec> {
        self.spec
            .interfaces
            .iter()
            .find(|i| i.addresses.iter().any(|c| c.0.contains(&addr)))
    }

    fn one_range(path: &str, ports: &Option<PortList>) -> Result<(), SpecError> {
        if let Some(p) = ports {
            if p.0.len() != 1 || p.0[0].first < 1024 && p.0[0].last < 1024 {
                return Err(SpecError::field(
                    path,
                    format!(
                        "{} : give one range of source ports, e.g. \"1024-65535\"",
                        p.0.iter()
                            .map(|x| x.to_string())
                            .collect::<Vec<_>>()
                            .join(",")
                    ),
                ));
            }
        }
        Ok(())
    }

    fn validate_nat(&self, path: &str, nat: &NatSpec) -> Result<(), SpecError> {
        for (i, m) in nat.masquerade.iter().enumerate() {
            let ifc = self.interface_named(&format!("{path}.masquerade[{i}].to"), &m.to)?;
            if ifc.addresses.is_empty() {
                return Err(SpecError::field(
                    format!("{path}.masquerade[{i}].to"),
                    format!("interface {:?} has no address to masquerade to", m.to),
                ));
            }
            Self::one_range(&format!("{path}.masquerade[{i}].ports"), &m.ports)?;
        }
        for (i, r) in nat.snat.iter().enumerate() {
            if r.to.is_empty() {
                return Err(SpecError::field(
                    format!("{path}.snat[{i}].to"),
                    "the pool is empty",
                ));
            }
            for a in &r.to {
                if self.interface_for(*a).is_none() {
                    return Err(SpecError::field(
                        format!("{path}.snat[{i}].to"),
                        format!("{a} is on none of the appliance's interface networks"),
                    ));
                }
            }
            Self::one_range(&format!("{path}.snat[{i}].ports"), &r.ports)?;
        }
        for (i, f) in nat.port_forward.iter().enumerate() {
            let p = format!("{path}.port_forward[{i}]");
            let ifc = self.interface_named(&format!("{p}.from"), &f.from)?;
            if f.dst.is_none() && ifc.addresses.is_empty() {
                return Err(SpecError::field(
                    format!("{p}.dst"),
                    "needed: the interface has no address",
                ));
            }
            if let Some(d) = f.dst {
                if self.interface_for(d).is_none() {
                    return Err(SpecError::field(
                        format!("{p}.dst"),
                        format!("{d} is on none of the appliance's interface networks"),
                    ));
                }
            }
            if !f.proto.has_ports() {
                return Err(SpecError::field(
                    format!("{p}.proto"),
                    "port forwarding needs tcp or udp",
                ));
            }
            if f.dport.0.len() != 1 {
                return Err(SpecError::field(
                    format!("{p}.dport"),
                    "give one port or one range",
                ));
            }
            if f.to_port.is_some() && f.dport.0[0].first != f.dport.0[0].last {
                return Err(SpecError::field(
                    format!("{p}.to_port"),
                    "a port range forwards to the same ports: leave to_port out",
                ));
            }
        }
        if nat.max_bindings == Some(0) {
            return Err(SpecError::field(
                format!("{path}.max_bindings"),
                "must be at least 1",
            ));
        }
        Ok(())
    }

    fn validate_lb(&self, path: &str, lb: &LbSpec) -> Result<(), SpecError> {
        if lb.services.is_empty() {
            return Err(SpecError::field(
                format!("{path}.services"),
                "at least one virtual service",
            ));
        }
        let mut names = BTreeSet::new();
        for (i, v) in lb.services.iter().enumerate() {
            let p = format!("{path}.services[{i}]");
            check_label(&format!("{p}.name"), &v.name)?;
            if !names.insert(v.name.as_str()) {
                return Err(SpecError::field(
                    format!("{p}.name"),
                    format!("duplicate name {:?}", v.name),
                ));
            }
            if self.interface_for(v.vip).is_none() {
                return Err(SpecError::field(
                    format!("{p}.vip"),
                    format!("{} is on none of the appliance's interface networks", v.vip),
                ));
            }
            if !v.proto.has_ports() {
                return Err(SpecError::field(
                    format!("{p}.proto"),
                    "a virtual service needs tcp or udp",
                ));
            }
            if v.backends.is_empty() {
                return Err(SpecError::field(
                    format!("{p}.backends"),
                    "at least one backend",
                ));
            }
            let mut bn = BTreeSet::new();
            for (j, b) in v.backends.iter().enumerate() {
                check_label(&format!("{p}.backends[{j}].name"), &b.name)?;
                if !bn.insert(b.name.as_str()) {
                    return Err(SpecError::field(
                        format!("{p}.backends[{j}].name"),
                        format!("duplicate backend {:?}", b.name),
                    ));
                }
                if b.weight == 0 || b.weight > 1000 {
                    return Err(SpecError::field(
                        format!("{p}.backends[{j}].weight"),
                        format!("{} is outside 1..=1000", b.weight),
                    ));
                }
                if b.addr.is_ipv4() != v.vip.is_ipv4() {
                    return Err(SpecError::field(
                        format!("{p}.backends[{j}].addr"),
                        format!("{} and the VIP {} are of different families", b.addr, v.vip),
                    ));
                }
            }
            if let Some(src) = &v.source {
                self.interface_named(&format!("{p}.source"), src)?;
            } else if self.interface_for(v.backends[0].addr).is_none() {
                return Err(SpecError::field(
                    format!("{p}.source"),
                    "no interface is on the backends' network: name the source interface",
                ));
            }
            if let Some(h) = &v.health {
                if let Some(hp) = &h.path {
                    check_http_path(&format!("{p}.health.path"), hp)?;
                }
                if h.rise == 0 || h.fall == 0 || h.interval.ms() < 100 || h.timeout.ms() == 0 {
                    return Err(SpecError::field(
                        format!("{p}.health"),
                        "rise and fall at least 1, interval at least 100ms, timeout above 0",
                    ));
                }
            }
        }
        Ok(())
    }

    fn validate_rule(&self, path: &str, r: &RuleSpec) -> Result<(), SpecError> {
        if let Some(name) = &r.name {
            check_label(&format!("{path}.name"), name)?;
        }
        if let Some(from) = &r.from {
            if !self.spec.interfaces.iter().any(|i| &i.name == from) {
                return Err(SpecError::field(
                    format!("{path}.from"),
                    format!(
                        "unknown interface {from:?} (interfaces: {})",
                        self.spec
                            .interfaces
                            .iter()
                            .map(|i| i.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
        }
        let has_ports = r.sport.is_some() || r.dport.is_some();
        match r.proto {
            Some(p) if has_ports && !p.has_ports() => {
                return Err(SpecError::field(
                    format!("{path}.proto"),
                    format!("ports given but protocol {} has no ports", p.0),
                ))
            }
            None if has_ports => {
                return Err(SpecError::field(
                    format!("{path}.proto"),
                    "ports need proto: tcp or udp",
                ))
            }
            _ => {}
        }
        if let Some(t) = &r.icmp_type {
            match r.proto.map(|p| p.0) {
                Some(ip_proto::ICMP) => t.resolve(false),
                Some(ip_proto::ICMPV6) => t.resolve(true),
                _ => Err("icmp_type needs proto: icmp or icmpv6".to_string()),
            }
            .map_err(|m| SpecError::field(format!("{path}.icmp_type"), m))?;
        }
        // A rule mixing families can never match anything: catch the typo.
        let fams = |l: &Option<CidrList>| -> BTreeSet<bool> {
            l.iter()
                .flat_map(|c| c.0.iter())
                .map(|c| c.0.addr().is_ipv4())
                .collect()
        };
        let (sf, df) = (fams(&r.src), fams(&r.dst));
        if sf.len() == 1 && df.len() == 1 && sf != df {
            return Err(SpecError::field(
                path.to_string(),
                "src and dst are of different address families",
            ));
        }
        Ok(())
    }

    /// The backplane VNI: the spec's, else a stable value derived from the name.
    pub fn vni(&self) -> u32 {
        self.spec.vni.unwrap_or_else(|| {
            // FNV-1a: stable across builds and machines, unlike std's hasher.
            let mut h: u32 = 0x811c_9dc5;
            for b in self.metadata.name.bytes() {
                h ^= u32::from(b);
                h = h.wrapping_mul(0x0100_0193);
            }
            (h & 0x00ff_ffff).max(1)
        })
    }

    pub fn firewall(&self) -> Option<&FirewallSpec> {
        self.spec.services.iter().find_map(|s| match s {
            ServiceSpec::Firewall(f) => Some(f),
            _ => None,
        })
    }

    pub fn nat(&self) -> Option<&NatSpec> {
        self.spec.services.iter().find_map(|s| match s {
            ServiceSpec::Nat(n) => Some(n),
            _ => None,
        })
    }

    pub fn lb(&self) -> Option<&LbSpec> {
        self.spec.services.iter().find_map(|s| match s {
            ServiceSpec::Lb(l) => Some(l),
            _ => None,
        })
    }
}

/// Longest name of an interface, service, backend or rule, and of a label's key or value.
pub const MAX_LABEL_LEN: usize = 63;

/// A network device name as the kernel accepts it (`dev_valid_name`): 1-15 bytes (`IFNAMSIZ` less
/// the NUL), not `.` or `..`, no `/`, `:` or whitespace. Control characters are refused as well:
/// the name ends up in `ip` command lines, logs and status tables.
fn check_device(path: &str, dev: &str) -> Result<(), SpecError> {
    let why = if dev.is_empty() || dev.len() > 15 {
        Some("must be 1-15 bytes long")
    } else if dev == "." || dev == ".." {
        Some("\".\" and \"..\" are not device names")
    } else if dev
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        Some("must not contain '/', ':', whitespace or control characters")
    } else {
        None
    };
    match why {
        Some(why) => Err(SpecError::field(
            path,
            format!("invalid device name {dev:?}: {why}"),
        )),
        None => Ok(()),
    }
}

/// Names the spec refers to and that show up in status, metrics and logs: 1-63 of ASCII letters,
/// digits, `-`, `_` and `.`.
fn check_label(path: &str, name: &str) -> Result<(), SpecError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_LABEL_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        return Ok(());
    }
    Err(SpecError::field(
        path,
        format!(
            "invalid name {name:?}: use 1-{MAX_LABEL_LEN} ASCII letters, digits, '-', '_' and '.'"
        ),
    ))
}

/// A label key may carry a `prefix/` as in Kubernetes (`team.example/owner`).
fn check_label_key(path: &str, key: &str) -> Result<(), SpecError> {
    let ok = !key.is_empty()
        && key.len() <= 2 * MAX_LABEL_LEN
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'));
    if ok {
        return Ok(());
    }
    Err(SpecError::field(
        path,
        format!(
            "invalid label key {key:?}: use 1-{} ASCII letters, digits, '-', '_', '.' and '/'",
            2 * MAX_LABEL_LEN
        ),
    ))
}

/// Label values are free text, but one printable line: they are shown in tables and logs.
fn check_label_value(path: &str, value: &str) -> Result<(), SpecError> {
    if value.len() <= MAX_LABEL_LEN && !value.chars().any(char::is_control) {
        return Ok(());
    }
    Err(SpecError::field(
        path,
        format!(
            "invalid label value {value:?}: at most {MAX_LABEL_LEN} bytes, no control characters"
        ),
    ))
}

/// The health check writes the path into its request line: visible ASCII only (no space, CR or
/// LF that would end the line or smuggle headers), starting with `/`.
fn check_http_path(path: &str, p: &str) -> Result<(), SpecError> {
    let ok = p.starts_with('/') && p.len() <= 1024 && p.bytes().all(|b| b.is_ascii_graphic());
    if ok {
        return Ok(());
    }
    Err(SpecError::field(
        path,
        format!(
            "invalid HTTP path {p:?}: it must start with '/' and be at most 1024 visible ASCII characters (no spaces or line breaks; percent-encode them)"
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
apiVersion: dva/v1
kind: Appliance
metadata: { name: edge-fw }
spec:
  interfaces:
    - { name: outside, device: out0, addresses: [198.18.1.1/24] }
    - { name: inside, device: in0, addresses: [198.18.2.1/24] }
  layout: { dataplanes: { min: 1, initial: 2, max: 4 } }
  services:
    - firewall:
        default: drop
        rules:
          - { name: web, from: outside, dst: 198.18.2.0/24, proto: tcp, dport: [80, "5200-5201"], action: accept }
          - { from: outside, proto: icmp, icmp_type: echo-request, action: accept }
          - { from: inside, action: accept }
"#;

    fn err(text: &str) -> String {
        ApplianceSpec::from_yaml(text)
            .expect_err("must be rejected")
            .to_string()
    }

    #[test]
    fn parses_good_spec() {
        let s = ApplianceSpec::from_yaml(GOOD).unwrap();
        assert_eq!(s.name(), "edge-fw");
        assert_eq!(s.spec.layout.dataplanes.initial(), 2);
        let fw = s.firewall().unwrap();
        assert_eq!(fw.rules.len(), 3);
        assert_eq!(
            fw.rules[0].dport.as_ref().unwrap().0,
            vec![
                Ports {
                    first: 80,
                    last: 80
                },
                Ports {
                    first: 5200,
                    last: 5201
                }
            ]
        );
        assert_eq!(
            fw.rules[1].icmp_type.as_ref().unwrap().resolve(false),
            Ok(8)
        );
    }

    #[test]
    fn tcp_window_strict_by_default_liberal_on_request() {
        let s = ApplianceSpec::from_yaml(GOOD).unwrap();
        assert_eq!(s.firewall().unwrap().tcp_window, TcpWindowSpec::Strict);
        let s = ApplianceSpec::from_yaml(&GOOD.replace(
            "default: drop",
            "default: drop\n        tcp_window: liberal",
        ))
        .unwrap();
        assert_eq!(s.firewall().unwrap().tcp_window, TcpWindowSpec::Liberal);
        let e = err(&GOOD.replace("default: drop", "default: drop\n        tcp_window: loose"));
        assert!(
            e.contains("spec.services[0].firewall.tcp_window") && e.contains("loose"),
            "{e}"
        );
    }

    #[test]
    fn ratelimit_is_validated_with_its_path_and_goes_first() {
        let with = |rl: &str| {
            GOOD.replace(
                "  services:\n",
                &format!("  services:\n    - ratelimit: {rl}\n"),
            )
        };
        let s = ApplianceSpec::from_yaml(&with("{ new_flows_per_second: 10 }")).unwrap();
        let Some(ServiceSpec::Ratelimit(r)) = s.spec.services.first() else {
            panic!("ratelimit first: {:?}", s.spec.services);
        };
        let c = r.compile();
        assert_eq!((c.burst, c.prefix_v4, c.prefix_v6), (10, 32, 64));
        let e = err(&with("{ new_flows_per_second: 0 }"));
        assert!(
            e.contains("spec.services[0].ratelimit.new_flows_per_second"),
            "{e}"
        );
        let e = err(&with("{ new_flows_per_second: 5, prefix_v4: 33 }"));
        assert!(
            e.contains("spec.services[0].ratelimit.prefix_v4") && e.contains("33"),
            "{e}"
        );
        let e = err(&with("{ new_flows_per_second: 5, burst: 0 }"));
        assert!(e.contains("spec.services[0].ratelimit.burst"), "{e}");
        let e = err(&with("{ new_flows_per_second: 5, rate: 3 }"));
        assert!(e.contains("rate"), "{e}");
        // After the firewall it would drop SYNs the firewall already tracks.
        let after = format!("{GOOD}    - ratelimit: {{ new_flows_per_second: 5 }}\n");
        let e = err(&after);
        assert!(
            e.contains("spec.services[1].ratelimit") && e.contains("before"),
            "{e}"
        );
    }

    #[test]
    fn unknown_field_is_named() {
        let e = err(&GOOD.replace("default: drop", "default: drop\n        colour: red"));
        assert!(
            e.contains("spec.services[0].firewall") && e.contains("colour"),
            "{e}"
        );
    }

    #[test]
    fn bad_cidr_names_path_and_value() {
        let e = err(&GOOD.replace("dst: 198.18.2.0/24", "dst: 198.18.300.0/24"));
        assert!(
            e.contains("spec.services[0].firewall.rules[0].dst") && e.contains("198.18.300.0/24"),
            "{e}"
        );
    }

    #[test]
    fn port_out_of_range_names_path_and_value() {
        let e = err(&GOOD.replace("dport: [80,", "dport: [70000,"));
        assert!(e.contains("rules[0].dport") && e.contains("70000"), "{e}");
    }

    #[test]
    fn unknown_interface_reference() {
        let e = err(&GOOD.replace("from: inside", "from: dmz"));
        assert!(e.contains("rules[2].from") && e.contains("dmz"), "{e}");
    }

    #[test]
    fn layout_bounds() {
        let e = err(&GOOD.replace("initial: 2, max: 4", "initial: 5, max: 4"));
        assert!(e.contains("spec.layout.dataplanes"), "{e}");
    }

    #[test]
    fn device_names_are_checked_as_the_kernel_does() {
        for bad in [
            "",
            "0123456789abcdef",
            ".",
            "..",
            "a/b",
            "a:1",
            "a b",
            "a\tb",
            "in\n0",
        ] {
            let e = err(&GOOD.replace("device: in0", &format!("device: {bad:?}")));
            assert!(
                e.contains("spec.interfaces[1].device") && e.contains(&format!("{bad:?}")),
                "{bad:?}: {e}"
            );
        }
        for good in ["in0", "eth0.100", "veth-a_b", "012345678901234", "..."] {
            let spec = GOOD.replace("device: in0", &format!("device: {good:?}"));
            assert!(ApplianceSpec::from_yaml(&spec).is_ok(), "{good:?}");
        }
        let e = err(&GOOD.replace("device: in0", "device: out0"));
        assert!(
            e.contains("spec.interfaces[1].device") && e.contains("duplicate"),
            "{e}"
        );
    }

    #[test]
    fn a_host_selector_is_parsed_and_its_labels_checked() {
        let example = include_str!("../../../examples/edge-firewall.yaml");
        let with = |sel: &str| {
            ApplianceSpec::from_yaml(&example.replace(
                "  layout:\n",
                &format!("  layout:\n    host_selector: {sel}\n"),
            ))
        };
        let spec = with("{ zone: a, disk: ssd }").expect("a selector");
        assert_eq!(
            spec.spec.layout.host_selector,
            [("disk", "ssd"), ("zone", "a")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        );
        // Written back, it is still there; without one, nothing is written.
        let json = serde_json::to_string(&spec).expect("json");
        assert!(json.contains("\"host_selector\":{\"disk\":\"ssd\",\"zone\":\"a\"}"));
        let plain = ApplianceSpec::from_yaml(example).expect("example");
        assert!(!serde_json::to_string(&plain)
            .expect("json")
            .contains("host_selector"));
        for (sel, needle) in [
            ("{ \"bad key\": a }", "spec.layout.host_selector.bad key"),
            ("{ zone: \"a\\nb\" }", "spec.layout.host_selector.zone"),
            ("[zone]", "host_selector"),
        ] {
            let e = with(sel).expect_err(sel).to_string();
            assert!(e.contains(needle), "{sel}: {e}");
        }
    }

    #[test]
    fn names_and_labels_are_checked() {
        let e = err(&GOOD.replace("name: inside,", "name: \"in side\","));
        assert!(
            e.contains("spec.interfaces[1].name") && e.contains("\"in side\""),
            "{e}"
        );
        let e = err(&GOOD.replace("name: web,", "name: \"web\\r\\nx\","));
        assert!(
            e.contains("rules[0].name") && e.contains("web\\r\\nx"),
            "{e}"
        );
        let long = "x".repeat(MAX_LABEL_LEN + 1);
        let e = err(&GOOD.replace("name: outside,", &format!("name: {long},")));
        assert!(
            e.contains("spec.interfaces[0].name") && e.contains(&long),
            "{e}"
        );
        let labelled = |k: &str, v: &str| {
            GOOD.replace(
                "metadata: { name: edge-fw }",
                &format!("metadata: {{ name: edge-fw, labels: {{ {k:?}: {v:?} }} }}"),
            )
        };
        assert!(ApplianceSpec::from_yaml(&labelled("team.example/owner", "net ops")).is_ok());
        let e = err(&labelled("bad key", "x"));
        assert!(
            e.contains("metadata.labels") && e.contains("\"bad key\""),
            "{e}"
        );
        let e = err(&labelled("owner", "a\nb"));
        assert!(
            e.contains("metadata.labels.owner") && e.contains("a\\nb"),
            "{e}"
        );
    }

    #[test]
    fn health_check_paths_cannot_break_the_request_line() {
        let lb = |path: &str| {
            format!(
                r#"
apiVersion: dva/v1
kind: Appliance
metadata: {{ name: web-lb }}
spec:
  interfaces:
    - {{ name: outside, device: out0, addresses: [198.18.1.1/24] }}
    - {{ name: inside, device: in0, addresses: [198.18.2.1/24] }}
  services:
    - lb:
        services:
          - name: web
            vip: 198.18.1.10
            proto: tcp
            port: 80
            backends: [{{ name: server1, addr: 198.18.2.2, port: 80 }}]
            health: {{ type: http, path: {path:?} }}
"#
            )
        };
        assert!(ApplianceSpec::from_yaml(&lb("/healthz?x=1")).is_ok());
        for bad in ["/a\r\nX-Evil: 1", "/a b", "healthz", ""] {
            let e = err(&lb(bad));
            assert!(
                e.contains("spec.services[0].lb.services[0].health.path"),
                "{bad:?}: {e}"
            );
        }
    }

    #[test]
    fn syntax_error_is_reported() {
        assert!(matches!(
            ApplianceSpec::from_yaml("spec: [unclosed"),
            Err(SpecError::Syntax(_))
        ));
    }

    #[test]
    fn vni_is_stable() {
        let s = ApplianceSpec::from_yaml(GOOD).unwrap();
        assert_eq!(s.vni(), s.clone().vni());
        assert!(s.vni() < 1 << 24 && s.vni() > 0);
    }

    /// GOOD with a `runtime:` section of `fields` (YAML flow-mapping entries).
    fn with_runtime(fields: &str) -> String {
        GOOD.replace(
            "  layout: {",
            &format!("  runtime: {{ {fields} }}\n  layout: {{"),
        )
    }

    #[test]
    fn runtime_defaults_to_what_units_did_without_it() {
        let s = ApplianceSpec::from_yaml(GOOD).unwrap();
        let r = &s.spec.runtime;
        assert!(r.is_default());
        assert_eq!(r.driver, DriverSpec::Auto);
        assert_eq!(r.busy_poll_us(), 0);
        assert!(r.backplane.rings());
        assert_eq!(r.cpus, None);
        // Left out of the JSON when default, so specs without it read back as they were written.
        let j = serde_json::to_value(&s).unwrap();
        assert!(j["spec"].get("runtime").is_none(), "{j}");
    }

    #[test]
    fn runtime_fields_parse_and_round_trip() {
        let s = ApplianceSpec::from_yaml(&with_runtime(
            "driver: af_packet, busy_poll: 50us, backplane: udp, cpus: \"0, 2-4,4\"",
        ))
        .unwrap();
        let r = &s.spec.runtime;
        assert_eq!(r.driver, DriverSpec::AfPacket);
        assert_eq!(r.busy_poll_us(), 50);
        assert_eq!(r.backplane, BackplaneSpec::Udp);
        assert!(!r.backplane.rings());
        assert_eq!(r.cpus, Some(CpuList(vec![0, 2, 3, 4, 4])));
        let j = serde_json::to_value(&s).unwrap();
        assert_eq!(
            j["spec"]["runtime"],
            serde_json::json!({
                "driver": "af_packet", "busy_poll": "50us", "backplane": "udp", "cpus": "0,2-4,4"
            })
        );
        assert_eq!(ApplianceSpec::from_value(j).unwrap(), s);
        for (text, us) in [
            ("0", 0),
            ("\"2ms\"", 2000),
            ("\"1s\"", 1_000_000),
            ("\"0.5ms\"", 500),
        ] {
            let s = ApplianceSpec::from_yaml(&with_runtime(&format!("busy_poll: {text}"))).unwrap();
            assert_eq!(s.spec.runtime.busy_poll_us(), us, "{text}");
        }
        for (text, cpus) in [
            ("3", vec![3]),
            ("\"1\"", vec![1]),
            ("\"0-3\"", vec![0, 1, 2, 3]),
        ] {
            let s = ApplianceSpec::from_yaml(&with_runtime(&format!("cpus: {text}"))).unwrap();
            assert_eq!(s.spec.runtime.cpus, Some(CpuList(cpus)), "{text}");
        }
        for driver in ["auto", "af_xdp"] {
            assert!(ApplianceSpec::from_yaml(&with_runtime(&format!("driver: {driver}"))).is_ok());
        }
        assert!(ApplianceSpec::from_yaml(&with_runtime("backplane: shm")).is_ok());
    }

    #[test]
    fn bad_runtime_values_name_the_field_and_what_is_allowed() {
        for (fields, path, says) in [
            ("driver: dpdk", "spec.runtime.driver", "af_packet"),
            ("backplane: tcp", "spec.runtime.backplane", "udp"),
            ("busy_poll: 2s", "spec.runtime.busy_poll", "above 1s"),
            ("busy_poll: 50", "spec.runtime.busy_poll", "above 1s"),
            ("busy_poll: fast", "spec.runtime.busy_poll", "50us"),
            ("busy_poll: -1us", "spec.runtime.busy_poll", "-1us"),
            (
                "dispatcher_threads: 0",
                "spec.runtime.dispatcher_threads",
                "0 is not in 1..=64",
            ),
            (
                "dispatcher_threads: 65",
                "spec.runtime.dispatcher_threads",
                "65 is not in 1..=64",
            ),
            (
                "dataplane_threads: 0",
                "spec.runtime.dataplane_threads",
                "0 is not in 1..=64",
            ),
            (
                "cpus: \"3-1\"",
                "spec.runtime.cpus",
                "range \"3-1\" runs backwards",
            ),
            ("cpus: \"\"", "spec.runtime.cpus", "no CPU listed"),
            ("cpus: \"1,,2\"", "spec.runtime.cpus", "not a CPU number"),
            ("cpus: \"a\"", "spec.runtime.cpus", "\"a\""),
            (
                "cpus: 5000",
                "spec.runtime.cpus",
                "\"5000\" is not a CPU number (0..1023)",
            ),
            ("cpus: \"-1\"", "spec.runtime.cpus", "not a CPU number"),
            ("cpus: [0, 1]", "spec.runtime.cpus", "CPU list"),
            ("threads: 4", "spec.runtime", "threads"),
        ] {
            let e = err(&with_runtime(fields));
            assert!(e.contains(path) && e.contains(says), "{fields}: {e}");
        }
    }

    #[test]
    fn cpu_lists_parse_like_taskset_ones() {
        assert_eq!(parse_cpus("0,1"), Ok(vec![0, 1]));
        assert_eq!(parse_cpus("2-4, 7"), Ok(vec![2, 3, 4, 7]));
        for bad in ["", "a", "3-1", "1,,2", "5000", "-1"] {
            assert!(parse_cpus(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn cpu_lists_print_as_they_parse() {
        for list in [
            vec![0],
            vec![0, 1, 2, 3],
            vec![3, 2, 1],
            vec![0, 0, 1, 5, 7, 8],
            vec![2, 3, 0, 1],
        ] {
            let text = CpuList(list.clone()).to_string();
            assert_eq!(parse_cpus(&text), Ok(list), "{text}");
        }
        assert_eq!(CpuList(vec![0, 2, 3, 4, 9]).to_string(), "0,2-4,9");
    }

    #[test]
    fn round_trips_through_json() {
        let s = ApplianceSpec::from_yaml(GOOD).unwrap();
        let j = serde_json::to_value(&s).unwrap();
        assert_eq!(ApplianceSpec::from_value(j).unwrap(), s);
    }
}

/// JSON Schemas of the spec's own scalar types, which (de)serialise by hand: each says what the
/// parser takes, so the schema in docs/openapi.json accepts exactly what `dva apply` does.
mod schema {
    use schemars::gen::SchemaGenerator;
    use schemars::schema::Schema;
    use schemars::JsonSchema;

    fn from_json(v: serde_json::Value) -> Schema {
        // The values below are fixed, valid schemas: a failure would be a bug caught by the tests.
        serde_json::from_value(v).unwrap_or(Schema::Bool(true))
    }

    macro_rules! schema {
        ($t:ty, $name:literal, $json:expr) => {
            impl JsonSchema for $t {
                fn schema_name() -> String {
                    $name.into()
                }
                fn json_schema(_: &mut SchemaGenerator) -> Schema {
                    from_json($json)
                }
            }
        };
    }

    schema!(
        super::DurationSpec,
        "Duration",
        serde_json::json!({
            "description": "A duration: `500ms`, `2s`, `5m`, `1h`, or a number of seconds",
            "oneOf": [{ "type": "string", "pattern": "^[0-9]+(\\.[0-9]+)?(ms|s|m|h)$" }, { "type": "number", "minimum": 0 }]
        })
    );
    schema!(
        super::DurationUsSpec,
        "DurationUs",
        serde_json::json!({
            "description": "A duration to the microsecond: `50us`, `2ms`, `1s`, or a number of seconds",
            "oneOf": [{ "type": "string", "pattern": "^[0-9]+(\\.[0-9]+)?(us|ms|s|m|h)$" }, { "type": "number", "minimum": 0 }]
        })
    );
    schema!(
        super::CpuList,
        "CpuList",
        serde_json::json!({
            "description": "CPUs as taskset lists them: `0-3`, `0,2,4-7`, or one CPU number",
            "oneOf": [
                { "type": "string", "pattern": "^ *[0-9]+(-[0-9]+)?( *, *[0-9]+(-[0-9]+)?)* *$" },
                { "type": "integer", "minimum": 0, "maximum": 1023 }
            ]
        })
    );
    schema!(
        super::Cidr,
        "Cidr",
        serde_json::json!({
            "description": "An address with or without a prefix length: `198.18.1.1/24`, `2001:db8::1`",
            "type": "string"
        })
    );
    schema!(
        super::CidrList,
        "CidrList",
        serde_json::json!({
            "description": "One address or prefix, or a list of them",
            "oneOf": [{ "type": "string" }, { "type": "array", "items": { "type": "string" } }]
        })
    );
    schema!(
        super::PortList,
        "PortList",
        serde_json::json!({
            "description": "A port (`80`), a range (`8000-8080`), or a list of them",
            "oneOf": [
                { "type": "integer", "minimum": 0, "maximum": 65535 },
                { "type": "string", "pattern": "^[0-9]+(-[0-9]+)?$" },
                { "type": "array", "items": { "oneOf": [
                    { "type": "integer", "minimum": 0, "maximum": 65535 },
                    { "type": "string", "pattern": "^[0-9]+(-[0-9]+)?$" }
                ] } }
            ]
        })
    );
    schema!(
        super::Proto,
        "Proto",
        serde_json::json!({
            "description": "A protocol by name (`tcp`, `udp`, `icmp`, `icmpv6`, ...) or number",
            "oneOf": [{ "type": "string" }, { "type": "integer", "minimum": 0, "maximum": 255 }]
        })
    );
    schema!(
        super::IcmpType,
        "IcmpType",
        serde_json::json!({
            "description": "An ICMP type by name (`echo-request`, ...) or number",
            "oneOf": [{ "type": "string" }, { "type": "integer", "minimum": 0, "maximum": 255 }]
        })
    );
}

/// The spec's JSON Schema as OpenAPI 3.0 component schemas: `ApplianceSpec` and every type it
/// refers to (`#/components/schemas/...`), for docs/openapi.json (a test keeps them equal).
pub fn openapi_schemas() -> serde_json::Map<String, serde_json::Value> {
    let gen = schemars::gen::SchemaSettings::openapi3().into_generator();
    let root = gen.into_root_schema_for::<ApplianceSpec>();
    let mut out = serde_json::Map::new();
    let mut spec = serde_json::to_value(&root.schema).unwrap_or_default();
    if let Some(o) = spec.as_object_mut() {
        o.remove("$schema");
    }
    out.insert("ApplianceSpec".into(), spec);
    for (name, s) in root.definitions {
        out.insert(name, serde_json::to_value(s).unwrap_or_default());
    }
    out
}
