//! Seeing traffic (issue #15): the connection table across data planes (`dva flows`), a
//! unit's running config (`dva config`), packet capture in the dispatchers (`dva capture`) and
//! the data planes' flow and drop events (`dva monitor`), through the units' control sockets.
//!
//! The API validates the filter before any unit is asked (a bad one is a 400 naming the value),
//! asks the units in parallel with a timeout each, and bounds what it returns to the limit
//! whatever the units send. A unit that does not answer is reported beside the flows of those
//! that did, not as a failure of the whole listing: during a failover some data plane is
//! always on its way.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use dva_io::capture::{pcap_header, FILE_HEADER_LEN, MAX_SNAPLEN, RECORD_HEADER_LEN};
use dva_unit::inspect::{CaptureSpec, FlowEntry, FlowFilter, FlowList};
use dva_unit::monitor::{MonitorEvent, MonitorSpec};

use crate::core::Mgmt;
use crate::model::{ApiError, UnitRole, UnitState};

/// How long one unit may take to answer (a listing of many flows is built on its data path's
/// turn; see `dva_unit::inspect::ANSWER_TIMEOUT`).
pub const UNIT_TIMEOUT: Duration = Duration::from_secs(5);

/// `GET /v1/appliances/{name}/flows`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FlowsView {
    pub appliance: String,
    pub flows: Vec<FlowEntry>,
    /// More flows matched than the limit (on some data plane, or all of them together).
    pub truncated: bool,
    /// Data planes that did not answer, and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<UnitError>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitError {
    pub unit: u32,
    pub error: String,
}

/// A unit of an appliance that serves: (id, role, how to reach it).
pub(crate) type Target = (u32, UnitRole, crate::provision::UnitLaunch);

/// The units an inspection asks: the one `unit` names (which must have a role `serves`, else
/// `wrong_role` says why), or every running unit whose role does.
fn pick(
    name: &str,
    units: Vec<Target>,
    unit: Option<u32>,
    serves: impl Fn(UnitRole) -> bool,
    wrong_role: impl Fn(u32, UnitRole) -> String,
) -> Result<Vec<Target>, ApiError> {
    let Some(id) = unit else {
        return Ok(units.into_iter().filter(|t| serves(t.1)).collect());
    };
    let t = units.into_iter().find(|t| t.0 == id).ok_or_else(|| {
        ApiError::NotFound(format!("appliance {name:?} has no running unit {id}"))
    })?;
    if !serves(t.1) {
        return Err(ApiError::Invalid(wrong_role(id, t.1)));
    }
    Ok(vec![t])
}

impl Mgmt {
    /// The running units of `name` (ready or draining), with their control sockets.
    pub(crate) fn serving_units(&self, name: &str) -> Result<Vec<Target>, ApiError> {
        let all = self.inner.lock();
        let app = all
            .get(name)
            .ok_or_else(|| ApiError::NotFound(format!("no appliance named {name:?}")))?;
        Ok(app
            .rec
            .units
            .iter()
            .filter(|u| matches!(u.state, UnitState::Ready | UnitState::Draining))
            .map(|u| (u.id, u.role, crate::reconcile::launch(&self.inner, name, u)))
            .collect())
    }

    /// The connections the filter in `query` selects, from every data plane (or the one
    /// `unit=` names), at most `limit` in all.
    pub fn flows(&self, name: &str, query: &str) -> Result<FlowsView, ApiError> {
        let filter = FlowFilter::from_query(query).map_err(ApiError::BadRequest)?;
        let units = self.serving_units(name)?;
        let targets = pick(
            name,
            units,
            filter.unit,
            |r| r == UnitRole::Dataplane,
            |id, role| {
                format!(
                    "unit {id} is a {}: only data planes hold connections",
                    role.as_str()
                )
            },
        )?;
        let path = format!("/flows?{}", filter.to_query());
        let answers: Vec<(u32, Result<FlowList, String>)> = std::thread::scope(|s| {
            let handles: Vec<_> = targets
                .iter()
                .map(|(id, _, l)| (*id, s.spawn(|| ask_json::<FlowList>(&self.inner, l, &path))))
                .collect();
            handles
                .into_iter()
                .map(|(id, h)| {
                    (
                        id,
                        h.join()
                            .unwrap_or_else(|_| Err("asking the unit failed".into())),
                    )
                })
                .collect()
        });
        let mut view = FlowsView {
            appliance: name.to_string(),
            ..Default::default()
        };
        for (unit, answer) in answers {
            match answer {
                Ok(mut list) => {
                    // A unit's answer is trusted no further than the limit we asked for.
                    list.flows.truncate(filter.limit);
                    view.truncated |= list.truncated;
                    view.flows.extend(list.flows.into_iter().map(|mut f| {
                        f.unit = unit;
                        f
                    }));
                }
                Err(error) => view.errors.push(UnitError { unit, error }),
            }
        }
        if !filter.replicas {
            // A connection a current owner lists is its; the previous owner's copy is shown
            // only when it is the only one (then it is the one answering for the flow).
            let owned: std::collections::HashSet<_> = view
                .flows
                .iter()
                .filter(|f| !f.previous_owner)
                .map(|f| (f.proto, f.src, f.src_port, f.dst, f.dst_port))
                .collect();
            view.flows.retain(|f| {
                !f.previous_owner
                    || !owned.contains(&(f.proto, f.src, f.src_port, f.dst, f.dst_port))
            });
        }
        view.flows.sort_by(|a, b| {
            (a.unit, a.proto, a.src, a.src_port, a.dst, a.dst_port)
                .cmp(&(b.unit, b.proto, b.src, b.src_port, b.dst, b.dst_port))
        });
        if view.flows.len() > filter.limit {
            view.flows.truncate(filter.limit);
            view.truncated = true;
        }
        Ok(view)
    }

    /// The role config unit `unit` of `name` runs, backplane keys redacted (by the unit).
    pub fn unit_config(&self, name: &str, unit: &str) -> Result<serde_json::Value, ApiError> {
        let id: u32 = unit
            .parse()
            .map_err(|_| ApiError::BadRequest(format!("unit {unit:?} is not a unit id")))?;
        let (_, role, l) = self
            .serving_units(name)?
            .into_iter()
            .find(|t| t.0 == id)
            .ok_or_else(|| {
                ApiError::NotFound(format!("appliance {name:?} has no running unit {id}"))
            })?;
        if role == UnitRole::Manager {
            return Err(ApiError::Invalid(format!(
                "unit {id} is the manager: it runs no role config (ask a dispatcher or a data plane)"
            )));
        }
        ask_json(&self.inner, &l, "/config").map_err(ApiError::Internal)
    }
}

/// `GET path` on a unit's control socket (through its host's agent when it has one), answered
/// with JSON.
fn ask_json<T: serde::de::DeserializeOwned>(
    inner: &crate::core::Inner,
    l: &crate::provision::UnitLaunch,
    path: &str,
) -> Result<T, String> {
    let (status, body) = inner
        .provisioner
        .control_get(l, path, UNIT_TIMEOUT)
        .map_err(|e| format!("control socket {}: {e}", l.control.display()))?;
    if status != 200 {
        return Err(format!("HTTP {status}: {}", body.trim()));
    }
    serde_json::from_str(&body).map_err(|e| format!("unexpected answer: {e}"))
}

/// Live capture streams from one or more dispatchers (`GET /v1/appliances/{name}/capture`),
/// each already past its HTTP head and pcap file header; [`CaptureStreams::copy_to`] merges
/// them into one pcap stream.
pub struct CaptureStreams {
    spec: CaptureSpec,
    units: Vec<(u32, BufReader<UnixStream>)>,
}

/// Longest HTTP head a unit's capture answer may have.
const MAX_UNIT_HEAD: u64 = 4096;

impl Mgmt {
    /// Start a capture on the dispatcher `unit=` names, or on every running dispatcher.
    pub fn capture(&self, name: &str, query: &str) -> Result<CaptureStreams, ApiError> {
        let spec = CaptureSpec::from_query(query).map_err(ApiError::BadRequest)?;
        let units = self.serving_units(name)?;
        let targets = pick(
            name,
            units,
            spec.unit,
            |r| r == UnitRole::Dispatcher,
            |id, role| {
                format!(
                "unit {id} is a {}: capture runs in dispatchers (they see the interfaces and every backplane datagram)",
                role.as_str()
            )
            },
        )?;
        if targets.is_empty() {
            return Err(ApiError::Conflict(format!(
                "appliance {name:?} has no running dispatcher to capture on"
            )));
        }
        let query = CaptureSpec {
            unit: None,
            ..spec.clone()
        }
        .to_query();
        let mut streams = Vec::new();
        for (id, _, l) in targets {
            // Dropping the streams opened so far ends their sessions.
            let s = open_capture(&l.control, &query, spec.duration).map_err(|e| e.with_unit(id))?;
            streams.push((id, s));
        }
        Ok(CaptureStreams {
            spec,
            units: streams,
        })
    }
}

trait WithUnit {
    fn with_unit(self, id: u32) -> ApiError;
}

impl WithUnit for ApiError {
    fn with_unit(self, id: u32) -> ApiError {
        match self {
            ApiError::Invalid(m) => ApiError::Invalid(format!("unit {id}: {m}")),
            ApiError::Conflict(m) => ApiError::Conflict(format!("unit {id}: {m}")),
            ApiError::BadRequest(m) => ApiError::BadRequest(format!("unit {id}: {m}")),
            ApiError::NotFound(m) => ApiError::NotFound(format!("unit {id}: {m}")),
            ApiError::PreconditionFailed(m) => {
                ApiError::PreconditionFailed(format!("unit {id}: {m}"))
            }
            ApiError::Internal(m) => ApiError::Internal(format!("unit {id}: {m}")),
        }
    }
}

/// Ask a unit for a capture; on success the reader is past the head and the pcap file header.
fn open_capture(
    socket: &std::path::Path,
    query: &str,
    duration: Duration,
) -> Result<BufReader<UnixStream>, ApiError> {
    let mut r = open_stream(socket, &format!("/capture?{query}"), duration)?;
    let mut file_header = [0u8; FILE_HEADER_LEN];
    r.read_exact(&mut file_header)
        .map_err(|e| ApiError::Internal(format!("control socket {}: {e}", socket.display())))?;
    Ok(r)
}

/// Ask a unit for a stream at `target` that lasts `duration`; on success the reader is past
/// the HTTP head, at the body.
fn open_stream(
    socket: &std::path::Path,
    target: &str,
    duration: Duration,
) -> Result<BufReader<UnixStream>, ApiError> {
    let io =
        |e: std::io::Error| ApiError::Internal(format!("control socket {}: {e}", socket.display()));
    let mut s = UnixStream::connect(socket).map_err(io)?;
    s.set_write_timeout(Some(UNIT_TIMEOUT)).map_err(io)?;
    // The unit closes the stream at the deadline; a little more for the data path to answer.
    s.set_read_timeout(Some(duration + UNIT_TIMEOUT + UNIT_TIMEOUT))
        .map_err(io)?;
    write!(s, "GET {target} HTTP/1.0\r\nHost: unit\r\n\r\n").map_err(io)?;
    let mut r = BufReader::new(s);
    let mut head = Vec::new();
    let mut limited = (&mut r).take(MAX_UNIT_HEAD);
    loop {
        let before = head.len();
        let n = limited.read_until(b'\n', &mut head).map_err(io)?;
        if n == 0 {
            return Err(ApiError::Internal(
                "the unit closed the capture unanswered".into(),
            ));
        }
        if head[before..] == *b"\r\n" {
            break;
        }
    }
    let head = String::from_utf8_lossy(&head);
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    if status != 200 {
        let mut body = String::new();
        let _ = (&mut r).take(MAX_UNIT_HEAD).read_to_string(&mut body);
        let msg = body.trim().to_string();
        return Err(match status {
            400 => ApiError::BadRequest(msg),
            409 => ApiError::Conflict(msg),
            422 => ApiError::Invalid(msg),
            _ => ApiError::Internal(format!("HTTP {status}: {msg}")),
        });
    }
    Ok(r)
}

impl CaptureStreams {
    /// Write one pcap stream to `out`: the file header, then every unit's records as they
    /// come, at most `count` in all. Returns how many records were written. Ends when every
    /// unit ended its stream, the count is reached, or `out` fails (the client went away).
    pub fn copy_to(self, out: &mut dyn Write) -> std::io::Result<u64> {
        out.write_all(&pcap_header(self.spec.snaplen as u32))?;
        out.flush()?;
        let count = self.spec.count;
        // Kept to end the readers' blocking reads once we stop early.
        let closers: Vec<UnixStream> = self
            .units
            .iter()
            .filter_map(|(_, r)| r.get_ref().try_clone().ok())
            .collect();
        let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(256);
        std::thread::scope(|scope| {
            for (_, r) in self.units {
                let tx = tx.clone();
                scope.spawn(move || read_records(r, &tx));
            }
            drop(tx);
            let mut written = 0u64;
            let mut result = Ok(());
            for rec in rx.iter() {
                if let Err(e) = out.write_all(&rec).and_then(|()| out.flush()) {
                    result = Err(e);
                    break;
                }
                written += 1;
                if written >= count {
                    break;
                }
            }
            for c in &closers {
                let _ = c.shutdown(std::net::Shutdown::Both);
            }
            result.map(|()| written)
        })
    }
}

/// Pass a unit's pcap records on, whole, until its stream ends. A record longer than any snap
/// length ends it: the stream is no longer what the unit should send.
fn read_records(mut r: BufReader<UnixStream>, tx: &mpsc::SyncSender<Vec<u8>>) {
    loop {
        let mut h = [0u8; RECORD_HEADER_LEN];
        if r.read_exact(&mut h).is_err() {
            return;
        }
        let incl = u32::from_le_bytes([h[8], h[9], h[10], h[11]]) as usize;
        if incl > MAX_SNAPLEN {
            return;
        }
        let mut rec = vec![0u8; RECORD_HEADER_LEN + incl];
        rec[..RECORD_HEADER_LEN].copy_from_slice(&h);
        if r.read_exact(&mut rec[RECORD_HEADER_LEN..]).is_err() || tx.send(rec).is_err() {
            return;
        }
    }
}

/// Live monitor streams from one or more data planes (`GET /v1/appliances/{name}/monitor`),
/// each past its HTTP head; [`MonitorStreams::copy_to`] merges them into one stream of lines.
pub struct MonitorStreams {
    units: Vec<(u32, BufReader<UnixStream>)>,
}

/// Longest event line a unit may send (events are a few hundred bytes).
const MAX_EVENT_LINE: u64 = 16 * 1024;
/// How often a quiet stream checks that its client is still there.
const CLIENT_CHECK: Duration = Duration::from_secs(1);

impl Mgmt {
    /// Start a monitor session on the unit `unit=` names, or on every running data plane and
    /// dispatcher (their drops). The query is checked before any unit is asked.
    pub fn monitor(&self, name: &str, query: &str) -> Result<MonitorStreams, ApiError> {
        let spec = MonitorSpec::from_query(query).map_err(ApiError::BadRequest)?;
        let units = self.serving_units(name)?;
        let targets = pick(
            name,
            units,
            spec.unit,
            |r| r != UnitRole::Manager,
            |id, _| {
                format!("unit {id} is the manager: events come from data planes and dispatchers")
            },
        )?;
        if targets.is_empty() {
            return Err(ApiError::Conflict(format!(
                "appliance {name:?} has no running unit to monitor"
            )));
        }
        let target = format!(
            "/monitor?{}",
            MonitorSpec {
                unit: None,
                ..spec.clone()
            }
            .to_query()
        );
        let mut streams = Vec::new();
        for (id, _, socket) in targets {
            // Dropping the streams opened so far ends their sessions.
            let s = open_stream(&socket.control, &target, spec.duration)
                .map_err(|e| e.with_unit(id))?;
            streams.push((id, s));
        }
        Ok(MonitorStreams { units: streams })
    }
}

impl MonitorStreams {
    /// Write every unit's events to `out` as they come, one JSON object per line, each
    /// stamped with the unit it came from. Ends when every unit ended its stream, `out` fails,
    /// or `client_gone` says the client went away (asked every [`CLIENT_CHECK`] while quiet).
    /// Returns how many lines were written.
    pub fn copy_to(
        self,
        out: &mut dyn Write,
        mut client_gone: impl FnMut() -> bool,
    ) -> std::io::Result<u64> {
        let closers: Vec<UnixStream> = self
            .units
            .iter()
            .filter_map(|(_, r)| r.get_ref().try_clone().ok())
            .collect();
        let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(1024);
        std::thread::scope(|scope| {
            for (unit, r) in self.units {
                let tx = tx.clone();
                scope.spawn(move || read_events(unit, r, &tx));
            }
            drop(tx);
            let mut written = 0u64;
            let mut result = Ok(());
            loop {
                match rx.recv_timeout(CLIENT_CHECK) {
                    Ok(line) => {
                        if let Err(e) = out.write_all(&line).and_then(|()| out.flush()) {
                            result = Err(e);
                            break;
                        }
                        written += 1;
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        if client_gone() {
                            break;
                        }
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            }
            // Ends the readers' blocking reads, and the units' sessions with them.
            for c in &closers {
                let _ = c.shutdown(std::net::Shutdown::Both);
            }
            result.map(|()| written)
        })
    }
}

/// Pass a unit's events on, each checked to be an event and stamped with `unit`, until its
/// stream ends. A line too long or not an event ends it: the stream is not what a unit sends.
fn read_events(unit: u32, mut r: BufReader<UnixStream>, tx: &mpsc::SyncSender<Vec<u8>>) {
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut r).take(MAX_EVENT_LINE).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line.last() != Some(&b'\n') {
            return;
        }
        let Ok(mut event) = serde_json::from_slice::<MonitorEvent>(&line) else {
            return;
        };
        event.unit = unit;
        let Ok(mut out) = serde_json::to_vec(&event) else {
            return;
        };
        out.push(b'\n');
        if tx.send(out).is_err() {
            return;
        }
    }
}
