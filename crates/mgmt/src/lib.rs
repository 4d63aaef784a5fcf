//! The management tool (`dva serve`): the desired state of every appliance in a durable store, a
//! reconciler that provisions compute units to match each appliance's layout and replaces those
//! that die, a link to each appliance's manager unit, and the public HTTP/JSON API.
//!
//! * [`model`]: records, views, events, errors (plain data);
//! * [`store`]: the [`Store`](store::Store) trait and the file-backed store (atomic replace per
//!   appliance);
//! * [`etcd`]: the etcd store, and the election among several `dva serve` replicas;
//! * [`core`]: [`Mgmt`], the operations the API and `dva run` call (apply, get, scale, delete, ...);
//! * [`reconcile`]: the loop that makes units match the records;
//! * [`pki`]: the installation's CA and the certificates of units and of the tool itself;
//! * [`hosts`]: the registry of hosts running `dva agent`, their liveness, and the provisioner
//!   that starts units through their agents;
//! * [`agent`]: `dva agent`, the per-machine daemon that runs units for the management tool;
//! * [`provision`]: the [`Provisioner`](provision::Provisioner) trait and its `local` implementation;
//! * [`inspect`]: seeing traffic: flows across data planes, a unit's running config;
//! * [`metrics`]: the aggregated Prometheus `/metrics` (every unit's, and the tool's own);
//! * [`api`]: the HTTP server (routes, bearer-token auth, OpenAPI document).

pub mod agent;
pub mod api;
pub mod autoscale;
pub mod client;
pub mod core;
pub mod etcd;
pub mod hosts;
pub mod inspect;
pub mod metrics;
pub mod model;
pub mod pki;
pub mod provision;
pub mod reconcile;
pub mod store;

pub use crate::core::{Mgmt, MgmtOptions};
pub use model::*;
pub use reconcile::{Host, Hosts, Place, Topology};
