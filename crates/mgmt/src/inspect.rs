//! Seeing traffic (issue #15): the connection table across data planes (`dva flows`) and a
//! unit's running config (`dva config`), read from the units' control sockets.
//!
//! The API validates the filter before any unit is asked (a bad one is a 400 naming the value),
//! asks the units in parallel with a timeout each, and bounds what it returns to the limit
//! whatever the units send. A unit that does not answer is reported beside the flows of those
//! that did, not as a failure of the whole listing: during a failover some data plane is
//! always on its way.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use dva_unit::inspect::{FlowEntry, FlowFilter, FlowList};

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

/// A unit of an appliance that serves: (id, role, control socket).
pub(crate) type Target = (u32, UnitRole, PathBuf);

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
            .map(|u| {
                (
                    u.id,
                    u.role,
                    crate::reconcile::control_socket(&self.inner, name, u.id),
                )
            })
            .collect())
    }

    /// The connections the filter in `query` selects, from every data plane (or the one
    /// `unit=` names), at most `limit` in all.
    pub fn flows(&self, name: &str, query: &str) -> Result<FlowsView, ApiError> {
        let filter = FlowFilter::from_query(query).map_err(ApiError::BadRequest)?;
        let units = self.serving_units(name)?;
        let targets: Vec<Target> = match filter.unit {
            Some(id) => {
                let t = units.into_iter().find(|t| t.0 == id).ok_or_else(|| {
                    ApiError::NotFound(format!("appliance {name:?} has no running unit {id}"))
                })?;
                if t.1 != UnitRole::Dataplane {
                    return Err(ApiError::Invalid(format!(
                        "unit {id} is a {}: only data planes hold connections",
                        t.1.as_str()
                    )));
                }
                vec![t]
            }
            None => units
                .into_iter()
                .filter(|t| t.1 == UnitRole::Dataplane)
                .collect(),
        };
        let path = format!("/flows?{}", filter.to_query());
        let answers: Vec<(u32, Result<FlowList, String>)> = std::thread::scope(|s| {
            let handles: Vec<_> = targets
                .iter()
                .map(|(id, _, socket)| (*id, s.spawn(|| ask_json::<FlowList>(socket, &path))))
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
        let (_, role, socket) = self
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
        ask_json(&socket, "/config").map_err(ApiError::Internal)
    }
}

/// `GET path` on a unit's control socket, answered with JSON.
fn ask_json<T: serde::de::DeserializeOwned>(
    socket: &std::path::Path,
    path: &str,
) -> Result<T, String> {
    let (status, body) = dva_unit::control::get(socket, path, UNIT_TIMEOUT)
        .map_err(|e| format!("control socket {}: {e}", socket.display()))?;
    if status != 200 {
        return Err(format!("HTTP {status}: {}", body.trim()));
    }
    serde_json::from_str(&body).map_err(|e| format!("unexpected answer: {e}"))
}
