//! The unit channel: one long-lived stream per unit to its manager (and one from the management
//! tool to the manager), carrying newline-delimited JSON messages.
//!
//! Semantics follow Envoy's xDS: the manager pushes a whole role config with a `version` and a
//! `nonce`; the unit applies it and answers `Ack` or `Nack` (with its reason) quoting both. A NACKed
//! config changes nothing: the unit keeps serving the version it had. Units send `Report`s
//! (heartbeats with load and per-bucket flow counts) every [`REPORT_INTERVAL_MS`], and the
//! manager says it is alive as often ([`FromManager::Alive`]).

use std::io::{self, BufRead, Read, Write};
use std::net::SocketAddr;

use dva_flow::{BucketTable, UnitId};
use serde::{Deserialize, Serialize};

use crate::role::RoleConfig;
use crate::spec::ApplianceSpec;

pub const REPORT_INTERVAL_MS: u64 = 250;

/// Longest message accepted on the channel (a config with a 64k-bucket table fits easily).
pub const MAX_MESSAGE: usize = 16 << 20;

/// What a unit (or the management tool) sends to the manager.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToManager {
    /// First message of a unit's stream. `running` is the config the unit serves now (after a
    /// manager restart, the new manager adopts the newest table it hears of).
    Hello {
        unit: UnitId,
        role: String,
        pid: u32,
        running: Option<Running>,
    },
    Ack {
        version: u64,
        nonce: u64,
    },
    Nack {
        version: u64,
        nonce: u64,
        error: String,
    },
    Report(UnitReport),
    /// From the management tool: the desired state of the appliance.
    Desired(Box<Desired>),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Running {
    pub version: u64,
    pub table: BucketTable,
    /// The backplane keys the unit holds: a manager that takes over goes on with them, so
    /// units keep understanding each other across the change of manager.
    #[serde(default)]
    pub backplane: crate::role::BackplaneAuth,
    /// A data plane's: each bucket's backup under this table (see the data-plane config's
    /// `backups`). A manager that takes over without the old one's memory moves a dead owner's
    /// buckets to these, which hold their flows' state; recomputed, they could name others
    /// (the dead owner's machine is no longer known).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backups: Vec<UnitId>,
}

/// What the manager sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FromManager {
    Config {
        version: u64,
        nonce: u64,
        config: Box<RoleConfig>,
    },
    /// To the management tool, after every change and at least every second.
    Status(Box<ManagerStatus>),
    /// To every unit not taken for silent, every [`REPORT_INTERVAL_MS`]: a unit that hears
    /// nothing for [`MANAGER_SILENT_MS`] leaves the session and looks for a manager elsewhere. A
    /// machine that dies closes nothing, and a unit only ever writes on its channel, so without
    /// this it would wait on a dead manager until TCP gives up (minutes).
    Alive,
}

/// How long a unit waits without a word from its manager before it takes the session for dead.
/// Generous: the manager writes configs synchronously (a write to a unit that is busy applying
/// the previous one may wait up to its 2 s timeout) and a loaded machine stalls it further; a
/// unit that leaves a live manager reconnects, which costs a hello and a resend. A dead manager's
/// machine is only replaced after the management tool's `--host-lost-after` anyway.
pub const MANAGER_SILENT_MS: u64 = 5000;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UnitReport {
    /// The config version the unit runs.
    pub version: u64,
    pub rx_packets: u64,
    pub tx_packets: u64,
    pub drops: u64,
    /// Tracked connections (data planes).
    pub flows: u64,
    /// Connections still open (not closing or closed): what a draining data plane waits for.
    pub active_flows: u64,
    /// CPU the unit used over the last report interval, in percent of one core.
    #[serde(default)]
    pub cpu_percent: f64,
    /// Load-balancer backends as this dispatcher's health checks see them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub health: Vec<BackendHealth>,
    /// (bucket, connections) for every bucket where this data plane holds any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bucket_flows: Vec<(u16, u32)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendHealth {
    pub service: String,
    pub backend: String,
    pub up: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DesiredRole {
    Dispatcher,
    Dataplane,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DesiredUnit {
    pub id: UnitId,
    pub role: DesiredRole,
    pub addr: SocketAddr,
    /// A data plane being removed: it owns no buckets but still serves the flows it holds.
    pub draining: bool,
    /// A draining data plane past its deadline: it exports its flows' state to their buckets'
    /// owners.
    #[serde(default)]
    pub export: bool,
    /// The machine the unit runs on (the management tool's host name): the manager keeps a
    /// bucket's backup off its owner's machine, and takes the silence of one unit as a sign
    /// about the others there. `None` from a management tool that does not say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Desired {
    pub generation: u64,
    pub spec: ApplianceSpec,
    pub units: Vec<DesiredUnit>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnitStatus {
    pub id: UnitId,
    pub connected: bool,
    /// Last version the unit ACKed (0: none).
    pub acked: u64,
    /// The last NACK, if it is for the newest version sent.
    pub nack: Option<String>,
    pub report: Option<UnitReport>,
    /// Buckets owned in the current table.
    pub buckets: u32,
    /// Buckets whose history still names this unit.
    pub history_buckets: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ManagerStatus {
    pub generation: u64,
    /// The newest config version compiled.
    pub version: u64,
    /// Every connected unit of the desired state ACKed `version`.
    pub converged: bool,
    /// Why the spec could not be compiled, or the last NACK.
    pub error: Option<String>,
    pub units: Vec<UnitStatus>,
    /// The manager unit that sent this (the leader).
    #[serde(default)]
    pub leader: UnitId,
}

/// Write one message as a line.
pub fn send<W: Write, T: Serialize>(w: &mut W, msg: &T) -> io::Result<()> {
    let mut line = serde_json::to_vec(msg).map_err(io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line)?;
    w.flush()
}

/// Read one message; `Ok(None)` at end of stream. A malformed or oversized line is an error (the
/// peer is not speaking this protocol: close the stream).
pub fn recv<R: BufRead, T: for<'de> Deserialize<'de>>(r: &mut R) -> io::Result<Option<T>> {
    let mut line = Vec::new();
    let n = Read::by_ref(r)
        .take(MAX_MESSAGE as u64 + 1)
        .read_until(b'\n', &mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if line.len() > MAX_MESSAGE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "message too long",
        ));
    }
    serde_json::from_slice(&line)
        .map(Some)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}
