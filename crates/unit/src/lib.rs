//! The compute unit runtime: one OS process, generic until configured into a role.
//!
//! * [`dispatcher`] owns the appliance's interfaces (AF_PACKET), answers ARP for the appliance's
//!   addresses, hashes each packet to a flow bucket and sends it over the GENEVE backplane to the
//!   bucket's data plane; packets coming back from data planes are routed and transmitted. It keeps
//!   no per-flow state.
//! * [`dataplane`] runs the service chain (the stateful firewall) on the packets of the flows it owns,
//!   punting mid-flow packets it has no state for to the bucket's previous owner.
//! * [`control`] is the unit's local control socket (a Unix socket speaking minimal HTTP): readiness,
//!   JSON stats and Prometheus metrics, and [`inspect`]ion: flow listings, config dumps, capture,
//!   and the [`monitor`] stream of flow and drop events.
//! * [`metrics`] encodes stats as Prometheus text (prometheus-client), for the control socket and
//!   for `dva serve`'s aggregated `/metrics`.
//!
//! Data-path loops are single-threaded, never block on the control side (stats are published with
//! `try_lock`), and count every drop by reason.

pub mod channel;
pub mod classify;
pub mod control;
pub mod dataplane;
pub mod dispatcher;
pub mod handover;
pub mod inspect;
mod keys;
pub mod manager;
pub mod metrics;
pub mod monitor;
pub mod offload;
pub mod reply;
pub mod runtime;
pub mod stats;
pub mod tls;

pub use runtime::{run_unit, Role, UnitArgs};
pub use stats::UnitStats;
