//! What the management tool stores and shows: appliance records, units, events, and the views the
//! API and CLI return. Everything here is plain data (serde), kept in the durable store.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// Unix time in milliseconds (what the store and events carry).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnitRole {
    Manager,
    Dispatcher,
    Dataplane,
}

impl UnitRole {
    pub fn as_str(self) -> &'static str {
        match self {
            UnitRole::Manager => "manager",
            UnitRole::Dispatcher => "dispatcher",
            UnitRole::Dataplane => "dataplane",
        }
    }
}

/// A unit's life: `starting` (process up, no config ACKed yet), `ready` (serving its ACKed config),
/// `draining` (a data plane being removed: no new flows, serving its existing ones), `stopped`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnitState {
    Starting,
    Ready,
    Draining,
    Stopped,
    Failed,
}

/// A unit as the store remembers it (enough to find it again after a restart of `dva serve`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnitRecord {
    pub id: u32,
    pub role: UnitRole,
    /// The host (in the lab: a network namespace) it runs on.
    pub host: String,
    pub pid: Option<u32>,
    /// The process's start time (clock ticks after boot): with the pid, it names the process, so
    /// a pid reused by another process is never taken for the unit (nor signalled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid_start: Option<u64>,
    /// Backplane address (dispatchers and data planes).
    pub addr: Option<SocketAddr>,
    pub state: UnitState,
    pub started_ms: u64,
    /// When a data plane was told to drain; it is stopped once it holds no flows or past the deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draining_since_ms: Option<u64>,
    /// When a draining data plane past its deadline was told to export its flows' state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exporting_since_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub time_ms: u64,
    /// Short machine-readable kind: `applied`, `rejected`, `scaled`, `unit-started`, `unit-ready`,
    /// `unit-draining`, `unit-stopped`, `unit-died`, `config-nack`, ...
    pub reason: String,
    pub message: String,
}

/// One appliance in the store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApplianceRecord {
    pub name: String,
    /// The spec as the user sent it (YAML or JSON text), so `get -o json` can return it verbatim.
    pub spec_text: String,
    /// Bumped on every accepted apply or scale: the desired state's version.
    pub generation: u64,
    pub dataplanes: u32,
    /// How long a removed data plane may keep serving its existing flows before it is stopped.
    pub drain_deadline_ms: u64,
    pub units: Vec<UnitRecord>,
    pub next_unit_id: u32,
    pub events: Vec<Event>,
    pub created_ms: u64,
    /// The TCP port the appliance's managers listen on (on the host each runs on), chosen when
    /// the first manager starts and kept, so units started earlier find a replacement manager.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manager_port: Option<u16>,
}

/// Largest number of events kept per appliance (oldest dropped first).
pub const MAX_EVENTS: usize = 500;

/// Default drain deadline for a removed data plane.
pub const DEFAULT_DRAIN_DEADLINE_MS: u64 = 300_000;

/// `POST /v1/appliances/{name}/scale`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScaleRequest {
    pub dataplanes: u32,
    /// e.g. "2s", "500ms", "5m"; default: the appliance's drain deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_deadline: Option<String>,
}

/// A unit as the API shows it: the record joined with what the unit reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnitView {
    pub id: u32,
    pub role: UnitRole,
    pub host: String,
    pub state: UnitState,
    pub pid: Option<u32>,
    /// Config version the unit ACKed (0: none yet).
    pub config_version: u64,
    pub packets: u64,
    pub flows: u64,
    /// Buckets this data plane owns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buckets: Option<u32>,
    /// Managers only: whether this one leads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<bool>,
    /// The last config this unit refused, with the unit's reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `GET /v1/appliances/{name}/stats`: every unit's traffic counters as read from the unit just
/// now. Counters only grow while a unit lives, so a client computes rates from two successive
/// reads (per unit id; a unit whose `uptime_secs` went down restarted and starts a new series).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatsView {
    pub name: String,
    /// When the units were read (Unix ms): the time base for rates.
    pub time_ms: u64,
    pub units: Vec<UnitCounters>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnitCounters {
    pub id: u32,
    pub role: UnitRole,
    pub host: String,
    pub state: UnitState,
    /// Whether the unit answered in time (units starting or stopped are not asked); without an
    /// answer every counter is 0.
    pub answered: bool,
    pub uptime_secs: f64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Every drop, whatever the reason.
    pub drops: u64,
    pub flows: u64,
    pub active_flows: u64,
}

/// Appliance status: `pending` (units starting), `ready` (every unit serves the current config
/// version), `degraded` (running, but a unit is missing or NACKed), `deleting`, `error` (its
/// stored record could not be used: `error` says why and where the file was set aside; apply
/// the spec again or delete the appliance).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApplianceStatus {
    Pending,
    Ready,
    Degraded,
    Deleting,
    Error,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApplianceView {
    pub name: String,
    pub status: ApplianceStatus,
    pub generation: u64,
    /// The config version the manager pushes (0 before the first).
    pub config_version: u64,
    pub dataplanes: DataplaneCounts,
    pub units: Vec<UnitView>,
    /// Why the appliance is degraded or its last config was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Load-balancer backends as the dispatchers' health checks see them (empty without an LB
    /// stage with health checks).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<BackendView>,
    pub spec: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendView {
    pub service: String,
    pub backend: String,
    /// `up`, or `down` when most dispatchers' checks fail (then it gets no new flows).
    pub health: String,
    /// Dispatchers that find it up, of those checking.
    pub up_votes: u32,
    pub checks: u32,
    /// Why a check failed, as one dispatcher saw it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataplaneCounts {
    pub desired: u32,
    pub ready: u32,
    pub draining: u32,
    pub min: u32,
    pub max: u32,
}

/// Errors the API maps to HTTP statuses.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 404
    #[error("{0}")]
    NotFound(String),
    /// 422: the request parsed but its content is wrong (bad spec, scale out of bounds).
    #[error("{0}")]
    Invalid(String),
    /// 400: the request itself is malformed (not JSON, missing field).
    #[error("{0}")]
    BadRequest(String),
    /// 409
    #[error("{0}")]
    Conflict(String),
    /// 412: the write named a generation (`If-Match`) the appliance no longer has.
    #[error("{0}")]
    PreconditionFailed(String),
    /// 500
    #[error("{0}")]
    Internal(String),
}

/// How a write is carried out: kubectl's `--dry-run=server` and optimistic concurrency.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteOptions {
    /// Check everything and answer what the write would do, change nothing.
    pub dry_run: bool,
    /// The generation the writer last saw (HTTP `If-Match`): the write is refused with 412 if the
    /// appliance has another one (someone else changed it meanwhile), or does not exist.
    pub if_match: Option<u64>,
}

impl ApiError {
    pub fn status(&self) -> u16 {
        match self {
            ApiError::NotFound(_) => 404,
            ApiError::Invalid(_) => 422,
            ApiError::BadRequest(_) => 400,
            ApiError::Conflict(_) => 409,
            ApiError::PreconditionFailed(_) => 412,
            ApiError::Internal(_) => 500,
        }
    }
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::NotFound(_) => "not_found",
            ApiError::Invalid(_) => "invalid",
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Conflict(_) => "conflict",
            ApiError::PreconditionFailed(_) => "precondition_failed",
            ApiError::Internal(_) => "internal",
        }
    }
}

/// Durations in the API are written as in the spec ("2s", "500ms", "5m"): one parser for both.
pub use dva_proto::spec::parse_duration_ms;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("2s"), Ok(2000));
        assert_eq!(parse_duration_ms("500ms"), Ok(500));
        assert_eq!(parse_duration_ms("1.5m"), Ok(90_000));
        assert_eq!(parse_duration_ms("3"), Ok(3000));
        assert!(parse_duration_ms("-1s").is_err());
        assert!(parse_duration_ms("soon").is_err());
    }
}
